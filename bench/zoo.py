#!/usr/bin/env python
"""Model-zoo sweep: how onnxc generalizes beyond the fixtures.

Builds tiny random-weight Hugging Face models (hidden 64, 4 heads, head_dim 16, 2 layers, vocab 128; from config,
never from_pretrained) for many architectures and graph variants, exports each with both exporters (TorchScript,
opset 17, and dynamo, opset 18; the export code of fixtures/generate.py), with and without a KV cache for decoders,
checks the export against PyTorch on one shape other than the export example, then compiles each export with
`onnxc.compile(path, 2, "cpu")` and `onnxc.compile(path, 3, "cuda")` (both verify numerically on onnxruntime's CPU
execution provider). Every export group (one architecture) and every export's compiles run in child processes with
a time limit, so a crash, hang or exporter failure is recorded and the sweep goes on.

`--matrix` adds variant exports, each its own export directory (see `exports_of`): "core" adds, for decoders,
dynamo with its optimizer off (`_dynamo_raw`), exports without position_ids (`_nopos`: every exporter, prefill
and past) and exports from input_ids and the cache alone (`_nomask`: no attention_mask, no position_ids); "full" adds on top, for every arch, opset 23 (`_op23`; TorchScript refuses it, which is recorded), the
other attention implementation (`_eager` / `_sdpa`) and float16 (`_fp16`), one axis at a time from each default
export. A variant that repeats another export's graph is dropped (or, where only the model can tell, skipped).

The table gives, per export: nodes before -> after at -O2 cpu and -O3 cuda, the fused ops -O2 emits, the Softmax
nodes left, the verification outcome of both compiles, and the first line of any error (with the onnxc source line
it came from) or the fusion passes' refusal notes. A second table (`--markdown FILE` writes it) gives, per (arch,
variant), attention and norm sites fused / found and one reason per missed site: from the compile report's
`coverage` where it has one (the zoo's own count is shown where it differs), else counted from the compiled graph.
Where attention, a norm or a GELU is left unfused, the child replays the pipeline up to the fusion pass and asks the
pass's rules why each leftover site does not match (the fuse-gqa notes of the compile report; fuse-attention,
fuse-layer-norm, fuse-rms-norm and fuse-gelu rules matched at the site, as `onnxc compile --explain` does).

    python bench/zoo.py                       # everything: exports (cached) + compiles, table + bench/out/zoo/zoo.md
    python bench/zoo.py --only 'gemma*,bert*' # a glob (comma list) on architecture or export names
    python bench/zoo.py --list                # the architectures and exports
    python bench/zoo.py --jobs 2 --no-doc     # two architectures at a time; print only
    python bench/zoo.py --report-only         # re-render the table from the saved results
    python bench/zoo.py --matrix core --only 'llama*,qwen2*' --jobs 2 --markdown /tmp/variants.md

Exports land in bench/out/zoo/<export>/model.onnx (with meta.json: config, export check, failure) and are reused
on later runs unless --fresh; compiles always run again (results in result-O2-cpu.json / result-O3-cuda.json).
Needs torch and transformers (pip install -e '.[fixtures]').
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# ONNXC_ZOO_OUT moves the exports and results (e.g. a sweep under another transformers, run with that venv's python:
#   ONNXC_ZOO_OUT=bench/out/zoo-tf524 /path/to/venv/bin/python bench/zoo.py --matrix core --only 'llama*')
OUT = Path(os.environ.get("ONNXC_ZOO_OUT", ROOT / "bench" / "out" / "zoo")).resolve()
COMPILES = ((2, "cpu"), (3, "cuda"))
MS = "com.microsoft."
FUSED = {MS + "GroupQueryAttention": "GQA", MS + "Attention": "Attn", MS + "MultiHeadAttention": "MHA",
         MS + "SkipSimplifiedLayerNormalization": "SkipSLN", MS + "SkipLayerNormalization": "SkipLN",
         "SimplifiedLayerNormalization": "SLN", "LayerNormalization": "LN", MS + "BiasGelu": "BiasGelu",
         MS + "FastGelu": "FastGelu", MS + "Gelu": "Gelu", MS + "EmbedLayerNormalization": "EmbedLN",
         # standard ONNX ops an opset-23 (or 20) export already holds: left as the exporter wrote them
         "Attention": "onnx:Attention", "RMSNormalization": "onnx:RMSNorm", "RotaryEmbedding": "onnx:Rotary",
         "Gelu": "onnx:Gelu"}
ATTN_OPS = (MS + "GroupQueryAttention", MS + "Attention", MS + "MultiHeadAttention", "Attention")
NORM_OPS = (MS + "SkipSimplifiedLayerNormalization", MS + "SkipLayerNormalization", "SimplifiedLayerNormalization",
            "LayerNormalization", MS + "EmbedLayerNormalization", "RMSNormalization")
LEFT = ("Softmax", "ReduceMean", "Erf", "Tanh")   # ops whose survival means an unfused attention / norm / GELU
NORMS = ("LayerNormalization", "SimplifiedLayerNormalization")   # on a residual Add: an unfused skip norm

# ---------------------------------------------------------------------------------------------------- the zoo
V, H, N, KV, HD, L, FF, P = 128, 64, 4, 2, 16, 2, 128, 128   # vocab, hidden, heads, kv heads, head dim, ...


def _dec(**kw: Any) -> dict[str, Any]:
    """The llama-style config keys most decoders share, with overrides."""
    cfg = {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
           "num_attention_heads": N, "num_key_value_heads": KV, "head_dim": HD, "max_position_embeddings": P,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "attention_dropout": 0.0,
           "tie_word_embeddings": False}
    cfg.update(kw)
    return {k: v for k, v in cfg.items() if v is not None}


def _enc(**kw: Any) -> dict[str, Any]:
    cfg = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": N,
           "intermediate_size": FF, "max_position_embeddings": P, "pad_token_id": 0, "hidden_dropout_prob": 0.0,
           "attention_probs_dropout_prob": 0.0}
    cfg.update(kw)
    return {k: v for k, v in cfg.items() if v is not None}


@dataclass
class Arch:
    name: str
    kind: str                           # "decoder" or "encoder"
    config_cls: str
    model_cls: str
    config: dict[str, Any]
    attn: str = "sdpa"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    exporters: tuple[str, ...] = ("ts", "dynamo")
    opsets: dict[str, int] = field(default_factory=dict)   # exporter -> opset (default 17 / 18)
    dtype: str = "float32"
    static: bool = False                # batch 1, every dim fixed
    pasts: tuple[bool, ...] | None = None


EXPORTERS = ("ts", "dynamo", "dynamo-raw")   # TorchScript; dynamo with its optimizer on; dynamo with it off
MATRICES = ("default", "core", "full")
TS_MAX_OPSET = 20                           # torch.onnx's TorchScript exporter refuses anything newer
DTYPE_SUFFIX = {"float16": "_fp16", "float32": "_fp32"}


@dataclass
class Export:
    """One export of an architecture: the arch's defaults unless a variant axis says otherwise."""
    arch: Arch
    exporter: str                       # one of EXPORTERS
    past: bool
    positions: bool = True              # decoders: False drops position_ids even where the model takes them
    mask: bool = True                   # decoders: False exports input_ids (and the cache) alone, positions dropped
    opset_: int | None = None           # None: the arch's default for the exporter
    attn_: str | None = None            # None: the arch's attn_implementation
    dtype_: str | None = None           # None: the arch's dtype

    @property
    def tool(self) -> str:
        """The exporter family: "ts" or "dynamo" (the arch's `exporters` and `opsets` keys)."""
        return "ts" if self.exporter == "ts" else "dynamo"

    @property
    def optimize(self) -> bool:
        return self.exporter != "dynamo-raw"

    @property
    def default_opset(self) -> int:
        return self.arch.opsets.get(self.tool, 17 if self.tool == "ts" else 18)

    @property
    def opset(self) -> int:
        return self.opset_ or self.default_opset

    @property
    def attn(self) -> str:
        return self.attn_ or self.arch.attn

    @property
    def dtype(self) -> str:
        return self.dtype_ or self.arch.dtype

    @property
    def is_default(self) -> bool:
        """Whether this is one of the default sweep's exports (names and results as before the matrix)."""
        return self.exporter != "dynamo-raw" and self.positions and self.mask and not self.tags()

    def tags(self) -> list[str]:
        """The variant axes that differ from the arch's defaults, other than exporter and past."""
        return ([f"op{self.opset}"] if self.opset != self.default_opset else []) + (
            [self.attn] if self.attn != self.arch.attn else []) + (
            [DTYPE_SUFFIX[self.dtype][1:]] if self.dtype != self.arch.dtype else [])

    @property
    def variant(self) -> str:
        """A short description: exporter, prefill or past, then the non-default axes."""
        return ", ".join([self.exporter, "past" if self.past else "prefill" if self.arch.kind == "decoder" else "-",
                          *([] if self.positions else ["nopos"]), *([] if self.mask else ["nomask"]),
                          *self.tags()])

    @property
    def name(self) -> str:
        """`<arch>_<ts|dynamo>[_raw][_nomask|_nopos][_past][_opNN][_eager|_sdpa][_fp16]`, as fixtures/generate.py
        names."""
        return (f"{self.arch.name}_{self.tool}" + ("_raw" if not self.optimize else "")
                + ("_nomask" if not self.mask else "_nopos" if not self.positions else "")
                + ("_past" if self.past else "")
                + "".join("_" + t for t in self.tags()))

    def key(self) -> str:
        """What makes two exports the same graph (the arch name aside): config, classes and every axis."""
        a = self.arch
        return json.dumps([a.config_cls, a.model_cls, a.config, a.model_kwargs, a.static, self.exporter, self.past,
                           self.positions, self.opset, self.attn, self.dtype]
                          + ([] if self.mask else ["nomask"]), sort_keys=True, default=str)


_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
             "short_factor": [1.0 + 0.05 * i for i in range(HD // 2)],
             "long_factor": [1.0 + 0.5 * i for i in range(HD // 2)]}
_GPT2 = {"vocab_size": V, "n_embd": H, "n_layer": L, "n_head": N, "n_inner": FF, "n_positions": P,
         "bos_token_id": V - 1, "eos_token_id": V - 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
         "tie_word_embeddings": True}
_BERT = _enc(type_vocab_size=2)
_NO_POOL = {"add_pooling_layer": False}

ARCHS: list[Arch] = [
    # decoders
    Arch("llama3", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(rope_parameters=_LLAMA3_ROPE),
         notes="llama3 rope scaling"),
    Arch("llama_eager", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(), attn="eager", notes="eager attention"),
    Arch("mistral", "decoder", "MistralConfig", "MistralForCausalLM", _dec(sliding_window=32),
         notes="sliding window 32"),
    Arch("qwen2", "decoder", "Qwen2Config", "Qwen2ForCausalLM", _dec(use_sliding_window=False), notes="qkv bias"),
    Arch("qwen3", "decoder", "Qwen3Config", "Qwen3ForCausalLM", _dec(use_sliding_window=False, tie_word_embeddings=True),
         notes="q/k RMSNorm per head"),
    Arch("phi3_longrope", "decoder", "Phi3Config", "Phi3ForCausalLM",
         _dec(rope_parameters=_LONGROPE, original_max_position_embeddings=64),
         notes="packed qkv_proj, longrope scaling"),
    Arch("phi4_mini", "decoder", "Phi3Config", "Phi3ForCausalLM",
         _dec(hidden_size=4 * 64, head_dim=None, tie_word_embeddings=True, original_max_position_embeddings=64,
              partial_rotary_factor=0.75,
              rope_parameters={**_LONGROPE, "partial_rotary_factor": 0.75,
                               "short_factor": [1.0 + 0.05 * i for i in range(24)],
                               "long_factor": [1.0 + 0.5 * i for i in range(24)]}),
         exporters=("dynamo",), notes="Phi-4-mini: longrope, partial rotary 0.75 of head size 64, tied embeddings"),
    Arch("gemma", "decoder", "GemmaConfig", "GemmaForCausalLM",
         _dec(num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
         notes="MQA, (1 + w) RMSNorm, GeGLU"),
    Arch("gemma2", "decoder", "Gemma2Config", "Gemma2ForCausalLM",
         _dec(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=32,
              query_pre_attn_scalar=HD, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
              layer_types=["sliding_attention", "full_attention"]),
         attn="eager", notes="logit softcapping, alternating sliding window, sandwich norms"),
    Arch("gemma3", "decoder", "Gemma3TextConfig", "Gemma3ForCausalLM",
         _dec(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, sliding_window=32,
              query_pre_attn_scalar=HD, layer_types=["sliding_attention", "full_attention"]),
         notes="q/k norm, local/global rope bases, sliding window"),
    Arch("smollm3", "decoder", "SmolLM3Config", "SmolLM3ForCausalLM",
         _dec(head_dim=None, tie_word_embeddings=True, no_rope_layer_interval=2, use_sliding_window=False),
         notes="NoPE every 2nd layer"),
    Arch("granite", "decoder", "GraniteConfig", "GraniteForCausalLM",
         _dec(head_dim=None, embedding_multiplier=12.0, attention_multiplier=0.2, residual_multiplier=0.22,
              logits_scaling=8.0), notes="embedding/residual/attention/logit multipliers"),
    Arch("olmo", "decoder", "OlmoConfig", "OlmoForCausalLM", _dec(head_dim=None, clip_qkv=8.0),
         notes="non-parametric LayerNorm, clip_qkv"),
    Arch("olmo2", "decoder", "Olmo2Config", "Olmo2ForCausalLM", _dec(head_dim=None),
         notes="post-norms, q/k RMSNorm over all heads"),
    Arch("stablelm", "decoder", "StableLmConfig", "StableLmForCausalLM",
         _dec(head_dim=None, use_qkv_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5}),
         notes="partial rotary 0.5, LayerNorm, qkv bias"),
    Arch("gpt_neox", "decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM",
         _dec(head_dim=None, num_key_value_heads=None, use_parallel_residual=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
         notes="Pythia: packed qkv, parallel residual, partial rotary 0.5"),
    Arch("gptj", "decoder", "GPTJConfig", "GPTJForCausalLM",
         {**{k: _GPT2[k] for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                                   "resid_pdrop", "embd_pdrop", "attn_pdrop")},
          "rotary_dim": 8, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False},
         attn="eager", notes="interleaved rotary (rotary_dim 8), parallel attn+MLP, gelu_new"),
    Arch("falcon", "decoder", "FalconConfig", "FalconForCausalLM",
         {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": N,
          "max_position_embeddings": P, "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0,
          "attention_dropout": 0.0, "multi_query": True, "parallel_attn": True, "bias": False,
          "new_decoder_architecture": False, "alibi": False},
         notes="falcon-7b style: MQA, packed qkv, parallel attn+MLP, exact gelu"),
    Arch("opt", "decoder", "OPTConfig", "OPTForCausalLM",
         {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": N, "ffn_dim": FF,
          "max_position_embeddings": P, "word_embed_proj_dim": H, "do_layer_norm_before": True, "dropout": 0.0,
          "attention_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2},
         notes="ReLU, learned positions from the mask cumsum, pre-LayerNorm"),
    Arch("bloom", "decoder", "BloomConfig", "BloomForCausalLM",
         {"vocab_size": V, "hidden_size": H, "n_layer": L, "n_head": N, "hidden_dropout": 0.0,
          "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
         attn="eager", notes="alibi, embedding LayerNorm, packed qkv"),
    Arch("gpt2_eager", "decoder", "GPT2Config", "GPT2LMHeadModel", dict(_GPT2), attn="eager",
         notes="eager attention (the fixture is sdpa)"),
    Arch("gpt2_sdpa", "decoder", "GPT2Config", "GPT2LMHeadModel", dict(_GPT2), notes="as the fixture"),
    Arch("codegen", "decoder", "CodeGenConfig", "CodeGenForCausalLM",
         {**{k: _GPT2[k] for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                                   "resid_pdrop", "embd_pdrop", "attn_pdrop")},
          "n_ctx": P, "rotary_dim": 8, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False},
         attn="eager", notes="packed qkv in mp_num blocks, interleaved rotary, parallel attn+MLP"),
    Arch("phi", "decoder", "PhiConfig", "PhiForCausalLM",
         _dec(head_dim=None, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5),
         notes="phi-2: parallel attn+MLP under one LayerNorm, partial rotary 0.5, dense bias, gelu_new"),
    Arch("phi_hd32", "decoder", "PhiConfig", "PhiForCausalLM",
         _dec(head_dim=None, hidden_size=2 * H, resid_pdrop=0.0, embd_pdrop=0.0, partial_rotary_factor=0.5),
         notes="phi-2 with head size 32: partial rotary (16 of 32) wide enough for the kernel"),
    Arch("starcoder2", "decoder", "Starcoder2Config", "Starcoder2ForCausalLM",
         _dec(head_dim=None, sliding_window=None, residual_dropout=0.0, embedding_dropout=0.0, use_bias=True),
         notes="LayerNorm with bias, biased GQA projections, non-gated gelu_pytorch_tanh MLP"),
    Arch("cohere", "decoder", "CohereConfig", "CohereForCausalLM", _dec(head_dim=None, logit_scale=0.5),
         notes="parallel attn+MLP, bias-free LayerNorm, interleaved rotary, logit scale"),
    Arch("nemotron", "decoder", "NemotronConfig", "NemotronForCausalLM",
         _dec(head_dim=None, partial_rotary_factor=0.5), notes="LayerNorm1P, relu^2 MLP, partial rotary 0.5"),
    Arch("glm", "decoder", "GlmConfig", "GlmForCausalLM", _dec(partial_rotary_factor=0.5),
         notes="partial interleaved rotary, fused gate_up, qkv bias"),
    Arch("mixtral", "decoder", "MixtralConfig", "MixtralForCausalLM",
         _dec(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), notes="mixture of experts"),
    # variants of llama
    Arch("llama_fp16", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(), dtype="float16",
         notes="model cast to float16 before export"),
    Arch("llama_static", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(), static=True,
         notes="batch 1, every dim static"),
    Arch("llama_op14", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(), exporters=("ts",), opsets={"ts": 14},
         notes="TorchScript opset 14"),
    Arch("llama_op23", "decoder", "LlamaConfig", "LlamaForCausalLM", _dec(), exporters=("dynamo",),
         opsets={"dynamo": 23}, notes="dynamo opset 23"),
    # encoders
    Arch("bert_eager", "encoder", "BertConfig", "BertModel", dict(_BERT), attn="eager", model_kwargs=_NO_POOL),
    Arch("bert_sdpa", "encoder", "BertConfig", "BertModel", dict(_BERT), model_kwargs=_NO_POOL, notes="as the fixture"),
    Arch("bert_op14", "encoder", "BertConfig", "BertModel", dict(_BERT), model_kwargs=_NO_POOL, exporters=("ts",),
         opsets={"ts": 14}, notes="TorchScript opset 14"),
    Arch("bert_op23", "encoder", "BertConfig", "BertModel", dict(_BERT), model_kwargs=_NO_POOL,
         exporters=("dynamo",), opsets={"dynamo": 23}, notes="dynamo opset 23"),
    Arch("roberta", "encoder", "RobertaConfig", "RobertaModel",
         _enc(type_vocab_size=1, pad_token_id=1, max_position_embeddings=P + 2), model_kwargs=_NO_POOL,
         notes="positions from the ids (cumsum of non-pad), one token type"),
    Arch("xlm_roberta", "encoder", "XLMRobertaConfig", "XLMRobertaModel",
         _enc(type_vocab_size=1, pad_token_id=1, max_position_embeddings=P + 2), model_kwargs=_NO_POOL),
    Arch("distilbert", "encoder", "DistilBertConfig", "DistilBertModel",
         {"vocab_size": V, "dim": H, "n_layers": L, "n_heads": N, "hidden_dim": FF, "max_position_embeddings": P,
          "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0}, notes="no token types"),
    Arch("albert", "encoder", "AlbertConfig", "AlbertModel", _enc(type_vocab_size=2, embedding_size=32),
         model_kwargs=_NO_POOL, notes="factorized embedding (32 -> 64), shared layers, gelu_new"),
    Arch("electra", "encoder", "ElectraConfig", "ElectraModel", _enc(type_vocab_size=2, embedding_size=32),
         notes="embeddings_project 32 -> 64"),
    Arch("deberta_v2", "encoder", "DebertaV2Config", "DebertaV2Model",
         _enc(type_vocab_size=0, relative_attention=True, position_buckets=32, max_relative_positions=-1,
              pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True),
         attn="eager", notes="disentangled relative attention"),
    Arch("modernbert", "encoder", "ModernBertConfig", "ModernBertModel",
         {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L,
          "num_attention_heads": N, "max_position_embeddings": P, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2, "local_attention": 8,
          "layer_types": ["full_attention", "sliding_attention"]},
         notes="rotary, GeGLU, bias-free LayerNorm, local attention window 8"),
    Arch("t5_encoder", "encoder", "T5Config", "T5EncoderModel",
         {"vocab_size": V, "d_model": H, "d_kv": HD, "d_ff": FF, "num_layers": L, "num_heads": N,
          "relative_attention_num_buckets": 32, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
          "is_encoder_decoder": False, "use_cache": False, "pad_token_id": 0, "eos_token_id": 1},
         notes="T5 v1.1 encoder (text encoder of diffusion pipelines): relative position bias with the mask folded "
               "in, unscaled scores, RMS norm, gated GELU"),
    Arch("mpnet", "encoder", "MPNetConfig", "MPNetModel", _enc(relative_attention_num_buckets=32, pad_token_id=1,
                                                             max_position_embeddings=P + 2),
         attn="eager", model_kwargs=_NO_POOL, notes="relative position bias, no token types (eager only)"),
]
ARCH_BY_NAME = {a.name: a for a in ARCHS}


def exports_of(a: Arch, matrix: str = "default") -> list[Export]:
    """The arch's exports under a matrix: "default" as always (each exporter of the arch, prefill and past);
    "core" adds, for decoders, dynamo with its optimizer off and exports without position_ids (every exporter,
    prefill and past); "full" adds on top, for every arch and default export, opset 23, the other attention
    implementation and float16, one axis at a time (not their cross product)."""
    pasts = a.pasts or ((False, True) if a.kind == "decoder" else (False,))
    out = [Export(a, e, p) for e in a.exporters for p in pasts]
    raw = ("dynamo-raw",) if "dynamo" in a.exporters else ()
    if matrix in ("core", "full") and a.kind == "decoder":
        out += [Export(a, e, p) for e in raw for p in pasts]
        out += [Export(a, e, p, positions=False) for e in (*a.exporters, *raw) for p in pasts]
        out += [Export(a, e, p, positions=False, mask=False) for e in (*a.exporters, *raw) for p in pasts]
    if matrix == "full":
        other = "eager" if a.attn != "eager" else "sdpa"
        for e in a.exporters:
            for p in pasts:
                out += [Export(a, e, p, opset_=23)] if Export(a, e, p).opset != 23 else []
                out += [Export(a, e, p, attn_=other)]
                out += [Export(a, e, p, dtype_="float16")] if a.dtype != "float16" else []
    return out


def select(only: str | None, matrix: str = "default") -> list[Export]:
    """Every arch's exports under `matrix`, filtered by `only`. A variant export whose graph another export
    already gives (gpt2_eager with sdpa is gpt2_sdpa) is dropped; the default ones never are."""
    every = [x for a in ARCHS for x in exports_of(a, matrix)]
    seen = {x.key() for x in every if x.is_default}
    unique = []
    for x in every:
        if not x.is_default:
            if x.key() in seen:
                continue
            seen.add(x.key())
        unique.append(x)
    if not only:
        return unique
    pats = [p.strip() for p in only.split(",") if p.strip()]
    return [x for x in unique if any(fnmatch.fnmatchcase(x.name, p) or fnmatch.fnmatchcase(x.arch.name, p)
                                     for p in pats)]


# ---------------------------------------------------------------------------------------------------- export child
def _export_child(arch_name: str, names: list[str], fresh: bool, per_export_s: int) -> int:
    """Build one architecture and write each requested export's model.onnx + meta.json (failures in meta.json)."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    import generate as gen
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    torch.set_num_threads(1)
    a = ARCH_BY_NAME[arch_name]
    todo = [x for x in exports_of(a, "full") if x.name in names
            and (fresh or not (OUT / x.name / "meta.json").exists())]
    if not todo:
        return 0
    built: dict[tuple[str, str], tuple[Any, Any]] = {}   # (attn, dtype) -> (pristine model, config)

    def build(attn: str, dtype: Any) -> tuple[Any, Any]:
        """The arch's model with one attention implementation, cast to `dtype` (same weights for all)."""
        cfg = getattr(transformers, a.config_cls)(**a.config)
        cfg._attn_implementation = attn
        cfg.use_cache = True
        torch.manual_seed(gen.SEED)
        model = getattr(transformers, a.model_cls)(cfg, **a.model_kwargs)
        try:
            gen.randomize_weights(model, gen.SEED)
        except RuntimeError:
            _randomize_any(model, gen.SEED)
        if getattr(cfg, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
            model.tie_weights()
        model.eval().to(dtype)
        return model, cfg

    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"export took longer than {per_export_s} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for x in todo:
        d = OUT / x.name
        d.mkdir(parents=True, exist_ok=True)
        for stale in ("model.onnx", "meta.json"):
            (d / stale).unlink(missing_ok=True)
        dtype = torch.float16 if x.dtype == "float16" else torch.float32
        meta: dict[str, Any] = {"export": x.name, "arch": a.name, "kind": a.kind, "exporter": x.exporter,
                                "opset": x.opset, "past": x.past, "positions": x.positions, "dtype": x.dtype,
                                "static": a.static, "attn": x.attn, "variant": x.variant, "hf_class": a.model_cls,
                                "notes": a.notes,
                                "versions": {"torch": torch.__version__.split("+")[0],
                                             "transformers": transformers.__version__}}
        stage = "build"
        t0 = time.time()
        signal.alarm(per_export_s)
        try:
            if x.tool == "ts" and x.opset > TS_MAX_OPSET:
                stage = "export"
                raise ValueError(f"the TorchScript exporter supports opsets up to {TS_MAX_OPSET}, not {x.opset}")
            if (x.attn, x.dtype) not in built:
                built[x.attn, x.dtype] = build(x.attn, dtype)
            model, cfg = built[x.attn, x.dtype]
            model = copy.deepcopy(model)    # an export can leave state behind (longrope's tables after dynamo)
            stage = "probe"
            io = _io(a, model, cfg, x)
            meta["io"] = {k: v for k, v in io.items() if k != "wrap"}
            if a.kind == "decoder" and not x.positions and x.mask and not io["takes_positions"]:
                meta["skipped"] = "the model takes no position_ids: the default export is already without them"
                raise _Skip()
            stage = "export"
            wrapper = io["wrap"](model)
            spec = _spec(gen, a, io, x.past)
            shp = (1, 3, 4) if a.static else (2, 3, 4) if x.past else (2, 5, 0)
            args = _inputs(gen, a, io, *shp, x.past, dtype, seed=3)
            if x.tool == "ts":
                proto = gen.export_torchscript(wrapper, args, spec, x.opset)
            else:
                with gen.quiet(), torch.no_grad():
                    proto = torch.onnx.export(wrapper, tuple(args), dynamo=True, opset_version=x.opset,
                                              dynamic_shapes=None if a.static else _dynamic(gen, a, io, x.past),
                                              input_names=spec.input_names, output_names=spec.output_names,
                                              optimize=x.optimize, verbose=False).model_proto
            stage = "finalize"
            proto = gen.finalize(proto, spec)
            gen.check_symbolic(proto, spec)
            data = proto.SerializeToString(deterministic=True)
            meta["export_seconds"] = round(time.time() - t0, 1)
            stage = "check"
            chk = (1, 3, 4) if a.static else (2, 2, 5) if x.past else (2, 6, 0)
            args = _inputs(gen, a, io, *chk, x.past, dtype, seed=7)
            with torch.no_grad():
                ref = wrapper(*args)
            ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = 1
            sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            feeds = {n: t.numpy() for n, t in zip(spec.input_names, gen.flatten_args(args))}
            got = sess.run(spec.output_names, feeds)
            worst = 0.0
            for r, g in zip(ref, got):
                r, g = r.float().numpy(), g.astype(np.float32)
                if r.shape != g.shape:
                    raise AssertionError(f"shape {g.shape} != torch {r.shape}")
                worst = max(worst, float(np.max(np.abs(r - g)) / max(1e-6, float(np.max(np.abs(r))))))
            tol = 2e-2 if x.dtype == "float16" else 1e-4
            meta["check"] = {"shape": chk, "max_rel": worst, "ok": worst <= tol}
            (d / "model.onnx").write_bytes(data)
            hist = gen.op_histogram(proto)
            meta.update(nodes=sum(hist.values()), ops=hist)
        except _Skip:
            pass
        except BaseException as exc:  # noqa: BLE001 - every failure is the sweep's data
            meta["failed"] = {"stage": stage, "error": f"{type(exc).__name__}: {_first(exc)}",
                              "where": _where(exc, ("transformers", "torch"))}
        finally:
            signal.alarm(0)
        meta["seconds"] = round(time.time() - t0, 1)
        (d / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        print(f"  exported {x.name}: " + (f"FAILED at {meta['failed']['stage']}: {meta['failed']['error']}"
                                          if "failed" in meta else f"skipped: {meta['skipped']}"
                                          if "skipped" in meta else f"{meta['nodes']} nodes, {meta['seconds']} s"),
              flush=True)
    return 0


class _Skip(Exception):
    """An export the matrix asks for that would only repeat another (its meta.json says why)."""


def _randomize_any(model: Any, seed: int) -> None:
    """Fallback init for modules fixtures/generate.py does not know: the same scales, by parameter shape and name."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                r = torch.randn(p.shape, generator=g)
                if "Norm" in type(module).__name__ and pname == "weight":
                    p.copy_(0.1 * r + (0.0 if bool((p == 0).all()) else 1.0))
                elif p.dim() >= 2:
                    p.copy_(r if "embed" in (mname + pname).lower() else r / math.sqrt(p.shape[-1]))
                else:
                    p.copy_(0.1 * r)


def _io(a: Arch, model: Any, cfg: Any, x: Export) -> dict[str, Any]:
    """Which inputs the export takes and its cache geometry (read from one forward pass, not from the config)."""
    import inspect

    import torch

    params = inspect.signature(model.forward).parameters
    io: dict[str, Any] = {}
    if a.kind == "encoder":
        io["token_types"] = "token_type_ids" in params and (getattr(cfg, "type_vocab_size", 0) or 0) >= 2
    else:
        io["takes_positions"] = "position_ids" in params
        io["positions"] = io["takes_positions"] and x.positions
        io["mask"] = x.mask
        if x.past:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([[3, 4]]), use_cache=True)
            shapes = {tuple(layer.keys.shape[1::2]) for layer in out.past_key_values.layers}
            if len(shapes) != 1:
                raise RuntimeError(f"cache layers differ in shape: {sorted(shapes)}")
            (io["kv_heads"], io["head_dim"]), = shapes
            io["cache_layers"] = len(out.past_key_values.layers)
    io["wrap"] = _wrapper(a.kind, io, x.past)
    return io


def _wrapper(kind: str, io: dict[str, Any], past: bool) -> Any:
    """fixtures/generate.py's wrappers (with and without position_ids); a smaller one for encoders without
    token types."""
    sys.path.insert(0, str(ROOT / "fixtures"))
    import generate as gen
    import torch
    from torch import nn

    if kind == "encoder":
        if io["token_types"]:
            return gen.Encoder

        class EncoderNoTypes(nn.Module):
            def __init__(self, model: nn.Module):
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return EncoderNoTypes
    if past:
        n_layers = io["cache_layers"]
        cls = (gen.DecoderWithPastNoMask if not io["mask"] else gen.DecoderWithPast if io["positions"]
               else gen.DecoderWithPastNoPositions)
        return lambda m: cls(m, n_layers)
    if not io["mask"]:
        return gen.DecoderNoMask
    return gen.DecoderNoPast if io["positions"] else gen.DecoderNoPositions


def _no_types(a: Arch, io: dict[str, Any]) -> bool:
    """An encoder export without a token_type_ids input (generate.py's encoder I/O has one)."""
    return a.kind == "encoder" and not io["token_types"]


def _spec(gen: Any, a: Arch, io: dict[str, Any], past: bool) -> Any:
    spec = gen.io_spec(a.kind, io.get("cache_layers", 0), past, positions=io.get("positions", True),
                       mask=io.get("mask", True))
    drop = {"token_type_ids"} if _no_types(a, io) else set()
    axes = {} if a.static else {k: v for k, v in spec.axes.items() if k not in drop}
    return gen.IOSpec([n for n in spec.input_names if n not in drop], spec.output_names, axes)


def _inputs(gen: Any, a: Arch, io: dict[str, Any], batch: int, seq: int, past_len: int, past: bool, dtype: Any,
            seed: int) -> list[Any]:
    cfg_sum = {"vocab": V, "num_layers": io.get("cache_layers", 0), "num_kv_heads": io.get("kv_heads", 1),
               "head_dim": io.get("head_dim", 1)}
    args = gen.make_inputs(a.kind, cfg_sum, batch, seq, past_len if past else None, dtype=dtype, seed=seed,
                           positions=io.get("positions", True), mask_input=io.get("mask", True))
    if _no_types(a, io):
        del args[2]
    return args


def _dynamic(gen: Any, a: Arch, io: dict[str, Any], past: bool) -> tuple[Any, ...]:
    """generate.py's dynamic shapes for the dynamo exporter, less token_type_ids where the encoder has none."""
    shapes = gen._dynamo_dynamic_shapes(a.kind, past, io.get("cache_layers", 0), positions=io.get("positions", True),
                                        mask=io.get("mask", True))
    return shapes[:2] if _no_types(a, io) else shapes


# ---------------------------------------------------------------------------------------------------- compile child
def _compile_child(src: str, level: int, target: str, dst: str, result: str) -> int:
    """One onnxc.compile with verification; on failure the error and its source line, and (when verification
    failed) the unverified compile's counts; then why leftover attention / norm / GELU sites did not fuse."""
    import onnxc
    from onnxc.errors import VerificationError

    res: dict[str, Any] = {"level": level, "target": target}
    rep = None
    t0 = time.time()
    try:
        rep = onnxc.compile(src, level, target, output=dst).report
        res["status"] = rep["verification"]["status"]
        res["max_rel"] = max((o["max_rel"] for s in rep["verification"].get("scenarios", [])
                              for o in s["outputs"]), default=None)
    except VerificationError as exc:
        res.update(status="verify-failed", error=_first(exc, 400))
        try:
            rep = onnxc.compile(src, level, target, output=dst, verify=False).report
        except Exception:  # noqa: BLE001
            rep = None
    except Exception as exc:  # noqa: BLE001
        res.update(status="crash", error=f"{type(exc).__name__}: {_first(exc, 400)}", where=_where(exc))
    res["seconds"] = round(time.time() - t0, 1)
    if rep is not None:
        res.update(nodes_before=rep["nodes_before"], nodes_after=rep["nodes_after"],
                   ops_after=rep["ops_after"],
                   notes=rep["notes"], rule_counts=rep["rule_counts"])
        left = {op: res["ops_after"].get(op, 0) for op in (*LEFT, *NORMS)}
        if any(left.values()):
            try:
                res["diagnosis"] = _diagnose(src, level, target, dst, rep["notes"])
            except Exception as exc:  # noqa: BLE001
                res["diagnosis"] = {"error": f"{type(exc).__name__}: {_first(exc)}", "where": _where(exc)}
        try:
            counted = _count_coverage(dst, res["ops_after"], res.get("diagnosis") or {})
        except Exception as exc:  # noqa: BLE001
            counted = None
            res["coverage_error"] = f"{type(exc).__name__}: {_first(exc)}"
        if rep.get("coverage"):     # the report's own count; where the zoo's count differs, that is kept too
            res.update(coverage=_refine(rep["coverage"], res.get("diagnosis") or {}), coverage_from="report")
            theirs = _families(res["coverage"])
            res["coverage_disagrees"] = {
                fam: f"{c['fused']}/{c['found']}" for fam, c in (counted or {}).items()
                if (c["fused"], c["found"]) != (theirs.get(fam, {}).get("fused"), theirs.get(fam, {}).get("found"))}
            listed = {fam: {m.get("site") for m in c["misses"]} for fam, c in theirs.items()}
            res["coverage_extra"] = {fam: extra for fam, c in (counted or {}).items()
                                     if (extra := [m for m in c["misses"] if m["site"] not in listed.get(fam, ())])}
        elif counted is not None:
            res.update(coverage=counted, coverage_from="counted")
    Path(result).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


def _diagnose(src: str, level: int, target: str, compiled: str, notes: list[str]) -> dict[str, Any]:
    """Replay the pipeline up to each fusion pass and ask its rules why each leftover site does not match.

    Leftover sites are the compiled model's Softmax (attention), ReduceMean (norms: the first of each site, see
    `_norm_sites`) and Erf/Tanh (GELU) nodes, found by name in the replayed graph. A site's reason is a failed check
    if any rule got that far, else the most common structural mismatch over the rules and nearby root nodes.
    "misses" gives one reason per attention and norm site (for attention, the fuse-gqa note where there is one)."""
    import onnx
    import onnx_ir as ir
    from onnxc import driver, pipeline
    from onnxc import ir as irio
    from onnxc import pass_manager as pm
    from onnxc import rules as _rules

    class _Deepest(_rules._Matcher):  # type: ignore[name-defined,misc]
        """The engine's matcher, remembered so the depth of its best failure can be read after a match."""
        last: Any = None

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            _Deepest.last = self

    _rules._Matcher = _Deepest   # this child process only
    out = onnx.load(compiled, load_external_data=False)
    left: dict[str, set[str]] = {op: {n.name for n in out.graph.node if n.op_type == op and n.domain in ("", "ai.onnx")}
                                 for op in LEFT}
    left["ReduceMean"] = {n.name for n in _norm_sites(out.graph)}
    producers = {o: n for n in out.graph.node for o in n.output}
    left["skip"] = {n.name for n in out.graph.node if n.op_type in NORMS and n.domain in ("", "ai.onnx")
                    and getattr(producers.get(n.input[0]), "op_type", "") == "Add"}
    model = irio.load(src)
    driver.check_input(model)
    ctx = pm.PassContext(level=level, target=target)
    chosen = pm.flatten(pipeline.build_pipeline(ctx))
    passes = pm.registered_passes()
    diag: dict[str, Any] = {"misses": {}}

    def sites(graph: ir.Graph, ops: tuple[str, ...], key: str | None = None) -> list[ir.Node]:
        named = [n for n in graph if n.op_type in ops and n.domain == "" and n.name in left[key or n.op_type]]
        return named or [n for n in graph if n.op_type in ops and n.domain == ""
                         and any(left[key or o] for o in ops)]

    def why(graph: ir.Graph, seeds: list[ir.Node], rules: list[Any], hops: int) -> list[tuple[str, str]]:
        """Per seed, (its name, the failure of the rule and nearby root that got furthest: most nodes bound)."""
        opset = model.opset_imports.get("", 21)
        positions = {id(n): i for i, n in enumerate(graph)}
        reasons: list[tuple[str, str]] = []
        for seed in seeds:
            near, frontier = [seed], [seed]
            for _ in range(hops):
                frontier = [u.node for n in frontier for o in n.outputs for u in o.uses()]
                near += frontier
            best: tuple[int, str] = (-2, "no candidate root nearby")
            for rule in rules:
                for node in dict.fromkeys(near):
                    if (node.domain, node.op_type) != rule.root_op:
                        continue
                    _Deepest.last = None
                    m = rule.match(graph, node, opset, positions)
                    depth = _Deepest.last.best[0] if _Deepest.last is not None else -1
                    text = (f"{rule.name}: {m}" if type(m).__name__ == "Failure" else
                            f"{rule.name}: matches here (another rule or pass consumed the site first?)")
                    if type(m).__name__ != "Failure":
                        depth = 1 << 31
                    if depth > best[0]:
                        best = (depth, text)
            reasons.append((seed.name, best[1]))
        return reasons

    def count(pairs: list[tuple[str, str]]) -> dict[str, int]:
        return dict(Counter(r for _, r in pairs))

    ran = 0
    for stop in ("fuse-layer-norm", "fuse-gelu", "fuse-attention", "fuse-skip-norm"):
        while ran < len(chosen) and chosen[ran].name != stop:
            pm.PassManager([chosen[ran]]).run(model, ctx)
            ran += 1
        if ran == len(chosen):
            break
        g = model.graph
        if stop == "fuse-layer-norm" and any(left["ReduceMean"]):
            rules = [*passes["fuse-layer-norm"].rules(), *passes["fuse-rms-norm"].rules()]
            norms = why(g, sites(g, ("ReduceMean",)), rules, 6)
            diag["norm"] = count(norms)
            diag["misses"]["norm"] = [{"site": n, "reason": r} for n, r in norms]
        elif stop == "fuse-gelu" and (left["Erf"] or left["Tanh"]):
            diag["gelu"] = count(why(g, sites(g, ("Erf", "Tanh")), list(passes["fuse-gelu"].rules()), 4))
        elif stop == "fuse-attention" and left["Softmax"]:
            from onnxc.passes import fuse_attention as fa
            from onnxc.rules import apply_rules

            gqa = {n.split(" not fused: ")[0].split(" at ")[-1]: n.split(" not fused: ")[-1]
                   for n in notes if n.startswith("fuse-gqa: attention at ")}
            attn: Counter[str] = Counter()
            gqa_reasons: Counter[str] = Counter()
            misses = []
            prepared = model.clone() if hasattr(model, "clone") else model
            apply_rules(prepared, getattr(fa, "PREPARE", []))
            pg = prepared.graph
            for sm in sites(pg, ("Softmax",)):
                if sm.name in gqa:
                    gqa_reasons[gqa[sm.name]] += 1
                (_, reason), = why(pg, [sm], list(getattr(fa, "RULES", [])), 3)
                attn[reason] += 1
                misses.append({"site": sm.name, "reason": f"fuse-gqa: {gqa[sm.name]}" if sm.name in gqa else reason})
            diag["attention"] = {"fuse-gqa": dict(gqa_reasons), "fuse-attention": dict(attn)}
            diag["misses"]["attention"] = misses
        elif stop == "fuse-skip-norm" and left["skip"]:
            diag["skip"] = count(why(g, sites(g, NORMS, "skip"), list(passes["fuse-skip-norm"].rules()), 0))
        pm.PassManager([chosen[ran]]).run(model, ctx)
        ran += 1
    return diag


def _norm_sites(graph: Any) -> list[Any]:
    """The unfused norm sites of an ONNX graph, one per LayerNorm or RMS norm: its ReduceMean over a square
    (Pow(x, 2) or Mul(x, x)), as compiler/coverage.py counts them."""
    producer = {o: n for n in graph.node for o in n.output}

    def square(v: str) -> bool:
        p = producer.get(v)
        return p is not None and (p.op_type == "Pow" or p.op_type == "Mul" and p.input[0] == p.input[1])

    return [n for n in graph.node if n.op_type == "ReduceMean" and n.domain in ("", "ai.onnx") and square(n.input[0])]


def _attention_sites(graph: Any) -> list[Any]:
    """The unfused attention sites of an ONNX graph: Softmax nodes whose output is the first operand of a MatMul
    (through at most three Cast/Where/Reshape: bloom-style bmm reshapes the probabilities), so that a router's
    Softmax is none."""
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i, v in enumerate(n.input):
            readers.setdefault(v, []).append((n, i))

    def to_matmul(v: str, depth: int = 3) -> bool:
        return any(n.op_type == "MatMul" and i == 0 or n.op_type in ("Cast", "Where", "Reshape") and depth > 0
                   and bool(n.output) and to_matmul(n.output[0], depth - 1) for n, i in readers.get(v, []))

    return [n for n in graph.node if n.op_type == "Softmax" and n.domain in ("", "ai.onnx") and to_matmul(n.output[0])]


def _refine(coverage: dict[str, Any], diag: dict[str, Any]) -> dict[str, Any]:
    """The report's coverage with each miss whose reason only points at `--explain` given the zoo diagnosis's
    reason for the same site instead (a fuse-gqa refusal is kept as the report words it)."""
    known = {fam: {m["site"]: m["reason"] for m in ms} for fam, ms in (diag.get("misses") or {}).items()}
    for fam, c in coverage.items():
        for m in c.get("misses", []) if isinstance(c, dict) else []:
            better = known.get(fam, {}).get(m.get("site"))
            if better and "--explain" in str(m.get("reason", "")):
                m["reason"] = better
    return coverage


def _count_coverage(compiled: str, ops_after: dict[str, int], diag: dict[str, Any]) -> dict[str, Any]:
    """Coverage the way a compile report's `coverage` key gives it, counted from the compiled graph where the
    report has none: attention sites are the fused attention ops plus the Softmax nodes left (`_attention_sites`);
    norm sites the fused norm ops plus the unfused norm sites (`_norm_sites`). A miss's reason comes from the
    diagnosis."""
    import onnx

    graph = onnx.load(compiled, load_external_data=False).graph
    left = {"attention": [n.name for n in _attention_sites(graph)], "norm": [n.name for n in _norm_sites(graph)]}
    ops = {"attention": ATTN_OPS, "norm": NORM_OPS}
    why = {fam: {m["site"]: m["reason"] for m in (diag.get("misses") or {}).get(fam, [])} for fam in left}
    fallback = f"(no diagnosis: {diag['error']})" if "error" in diag else "(not diagnosed)"
    out = {}
    for fam, sites in left.items():
        fused = sum(ops_after.get(op, 0) for op in ops[fam])
        out[fam] = {"found": fused + len(sites), "fused": fused,
                    "misses": [{"site": s, "reason": why[fam].get(s, fallback)} for s in sites]}
    return out


# ---------------------------------------------------------------------------------------------------- helpers
def _first(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _where(exc: BaseException, packages: tuple[str, ...] = ()) -> str:
    """The innermost frame of the original exception (the end of the `__cause__` chain) in this repository's
    compiler/ or passes/, or with `packages`, in a site-packages package of that name."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    best = ""
    for f in traceback.extract_tb(exc.__traceback__):
        path = Path(f.filename).resolve()
        if packages:
            parts = path.parts
            hit = next((parts.index(p) for p in packages if p in parts and "site-packages" in parts), None)
            rel = "/".join(parts[hit:]) if hit is not None else None
        else:
            rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in (
                "compiler", "passes") else None
        if rel:
            best = f"{rel}:{f.lineno} in {f.name}"
    return best


def _run(cmd: list[str], timeout: int, log: Path) -> tuple[int | None, str]:
    """A child in its own process group, killed (with its children) past `timeout`; returns (rc or None, tail)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    tail = log.read_text(errors="replace").strip().splitlines()
    return rc, (tail[-1] if tail else "")


# ---------------------------------------------------------------------------------------------------- sweep
def sweep_arch(a: Arch, xs: list[Export], args: argparse.Namespace) -> None:
    names = [x.name for x in xs]
    OUT.mkdir(parents=True, exist_ok=True)
    need = [x for x in xs if args.fresh or not (OUT / x.name / "meta.json").exists()]
    if need:
        t0 = time.time()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-export", a.name, ",".join(names),
               "--export-timeout", str(args.export_timeout)] + (["--fresh"] if args.fresh else [])
        rc, tail = _run(cmd, args.export_timeout * len(need) + 120, OUT / f"{a.name}.export.log")
        print(f"[{a.name}] exports: rc={rc} in {time.time() - t0:.0f} s", flush=True)
        for x in need:
            meta = OUT / x.name / "meta.json"
            if not meta.exists():
                (OUT / x.name).mkdir(parents=True, exist_ok=True)
                why = "timed out" if rc is None else f"export child exited with {rc}: {tail[:300]}"
                meta.write_text(json.dumps({"export": x.name, "arch": a.name, "exporter": x.exporter, "past": x.past,
                                            "positions": x.positions, "opset": x.opset, "attn": x.attn,
                                            "dtype": x.dtype, "variant": x.variant,
                                            "failed": {"stage": "child", "error": why}}) + "\n")
    for x in xs:
        d = OUT / x.name
        meta = json.loads((d / "meta.json").read_text())
        jobs = [(level, target, d / f"result-O{level}-{target}.json") for level, target in COMPILES]
        for level, target, res_path in jobs:
            res_path.unlink(missing_ok=True)
            (d / f"O{level}-{target}.log").unlink(missing_ok=True)
        if "failed" in meta or "skipped" in meta:
            continue
        _compile_export(d, jobs, args.compile_timeout)
        for level, target, res_path in jobs:
            r = json.loads(res_path.read_text())
            print(f"[{x.name}] -O{level} {target}: {r['status']} ({r.get('seconds', '?')} s)"
                  + (f" {r.get('error', '')[:160]}" if r.get("error") else ""), flush=True)


def _compile_export(d: Path, jobs: list[tuple[int, str, Path]], timeout: int) -> None:
    """Every compile of one export in one child (one interpreter start, not one per compile). Compiles the child
    left without a result run again one child each; after a time-out the compile it was in is recorded as such."""
    me = str(Path(__file__).resolve())

    def cmd(todo: list[tuple[int, str, Path]]) -> list[str]:
        return [sys.executable, me, "--child-compile", *[a for level, target, res in todo for a in (
            str(d / "model.onnx"), str(level), target, str(d / f"O{level}-{target}.onnx"), str(res))]]

    rc, tail = _run(cmd(jobs), timeout * len(jobs), d / "compile.log")
    cut = next((k for k, (*_, res) in enumerate(jobs) if not res.exists()), None) if rc is None else None
    for k, (level, target, res_path) in enumerate(jobs):
        if res_path.exists():
            continue
        if k != cut:
            rc, tail = _run(cmd([jobs[k]]), timeout, d / f"O{level}-{target}.log")
        if not res_path.exists():
            status = "timeout" if rc is None else "child-crash"
            res_path.write_text(json.dumps({"level": level, "target": target, "status": status,
                                            "error": f"child rc={rc}: {tail[:300]}"}) + "\n")


def load_results(xs: list[Export]) -> list[dict[str, Any]]:
    rows = []
    for x in xs:
        d = OUT / x.name
        if not (d / "meta.json").exists():
            continue
        row = {"export": x, "meta": json.loads((d / "meta.json").read_text())}
        for level, target in COMPILES:
            p = d / f"result-O{level}-{target}.json"
            row[(level, target)] = json.loads(p.read_text()) if p.exists() else None
        rows.append(row)
    return rows


def _fused(r: dict[str, Any] | None) -> str:
    if not r or "ops_after" not in r:
        return ""
    text = " ".join(f"{short} {r['ops_after'][op]}" for op, short in FUSED.items() if r["ops_after"].get(op))
    outside = (r.get("rule_counts") or {}).get("fuse-gqa:fuse-gqa/rotary-outside")
    gqa = f"GQA {r['ops_after'].get(MS + 'GroupQueryAttention', 0)}"
    return text.replace(gqa, f"{gqa} (rotary outside {outside})", 1) if outside else text


def _refusals(r: dict[str, Any] | None, limit: int = 2) -> list[str]:
    """The most frequent refusal lines of one compile: fuse-gqa notes first, then rule diagnoses."""
    if not r:
        return []
    out: list[str] = []
    d = r.get("diagnosis") or {}
    if "error" in d:
        out.append(f"(diagnosis failed: {d['error']})")
    att = d.get("attention", {})
    for src in ("fuse-gqa", "fuse-attention"):   # decoders: the GQA note; encoders: the fuse-attention rules
        for why, n in sorted(att.get(src, {}).items(), key=lambda kv: -kv[1])[:1]:
            out.append(f"attn x{n}: {why if src == 'fuse-attention' else 'fuse-gqa: ' + why}")
    for key in ("norm", "gelu", "skip"):
        for why, n in sorted(d.get(key, {}).items(), key=lambda kv: -kv[1])[:limit]:
            out.append(f"{key} x{n}: {why}")
    return out


def render(rows: list[dict[str, Any]], *, full: bool = True) -> str:
    lines = [("| export | opset | nodes | -O2 cpu | -O3 cuda | fused at -O2 cpu | Softmax left "
              "| left (ReduceMean/Erf/Tanh) | verify -O2 / -O3 | error or refusal |"),
             "|---|---:|---:|---:|---:|---|---:|---|---|---|"]
    for row in rows:
        x, meta = row["export"], row["meta"]
        if "failed" in meta:
            f = meta["failed"]
            lines.append(f"| {x.name} | {x.opset} | | | | | | | export failed ({f['stage']}) | "
                         f"{_cell(f['error'], 160)} |")
            continue
        if "skipped" in meta:
            lines.append(f"| {x.name} | {x.opset} | | | | | | | skipped | {_cell(meta['skipped'], 160)} |")
            continue
        o2, o3 = row[(2, "cpu")], row[(3, "cuda")]
        after = [str(r.get("nodes_after", "")) if r else "" for r in (o2, o3)]
        ops = (o2 or {}).get("ops_after", {})
        leftover = "/".join(str(ops.get(op, 0)) for op in LEFT[1:]) if ops else ""
        f3 = _fused(o3)
        fused = _fused(o2) + (f" (-O3: {f3})" if f3 != _fused(o2) and f3 else "")
        status = " / ".join(_status(r) for r in (o2, o3))
        chk = meta.get("check", {})
        notes = []
        if chk and not chk.get("ok"):
            notes.append(f"export != torch (rel {chk['max_rel']:.1e})")
        for r, tag in ((o2, "-O2"), (o3, "-O3")):
            if r and r.get("error"):
                notes.append(f"{tag}: {r['error'][:200]}" + (f" @ {r['where']}" if r.get("where") else ""))
        notes += _refusals(o2 or o3) if full else []
        lines.append(f"| {x.name} | {x.opset} | {meta.get('nodes', '')} | {after[0]} | {after[1]} | {fused} | "
                     f"{ops.get('Softmax', 0) if ops else ''} | {leftover} | {status} | "
                     f"{_cell('; '.join(notes), 600)} |")
    return "\n".join(lines)


def _status(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    s = r["status"]
    return {"passed": "ok", "verify-failed": "**FAIL**", "crash": "**CRASH**", "timeout": "**TIMEOUT**",
            "child-crash": "**CHILD CRASH**"}.get(s, s)


def _cell(s: str, limit: int) -> str:
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _families(cov: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A `coverage` mapping folded into "attention" and "norm" (a report may split them, e.g. fuse-gqa and
    fuse-attention, fuse-layer-norm and fuse-rms-norm; skip and embed norms are other sites' second fusion and
    are left out). Families are summed: found, fused and the misses."""
    out: dict[str, dict[str, Any]] = {}
    for fam, c in cov.items():
        f = fam.lower()
        key = ("attention" if "attn" in f or "attention" in f or "gqa" in f
               else "norm" if "norm" in f and "skip" not in f and "embed" not in f else None)
        if key is None or not isinstance(c, dict):
            continue
        acc = out.setdefault(key, {"found": 0, "fused": 0, "misses": []})
        acc["found"] += int(c.get("found", 0))
        acc["fused"] += int(c.get("fused", 0))
        acc["misses"] += list(c.get("misses") or [])
    return out


def _ratio(r: dict[str, Any] | None, fam: str) -> str:
    """"fused/found" of one family in one compile's result, or "" without coverage."""
    c = _families((r or {}).get("coverage") or {}).get(fam)
    return f"{c['fused']}/{c['found']}" if c else ""


def _misses(r: dict[str, Any] | None) -> list[str]:
    """One reason per missed attention or norm site, equal reasons counted together ("attn x2: ..."); then the
    sites the zoo counts and the report's coverage does not ("attn x2 (zoo only): ...")."""
    fams = _families((r or {}).get("coverage") or {})
    extra = (r or {}).get("coverage_extra") or {}
    out = []
    for fam, tag in (("attention", "attn"), ("norm", "norm")):
        for misses, more in ((fams.get(fam, {}).get("misses", []), ""), (extra.get(fam, []), " (zoo only)")):
            reasons = Counter(m.get("reason") or "(no reason given)" for m in misses)
            out += [f"{tag} x{n}{more}: {why}" for why, n in reasons.most_common()]
    return out


def render_coverage(rows: list[dict[str, Any]]) -> str:
    """The variant table: per (arch, variant), attention and norm sites fused / found at -O2 cpu (-O3 cuda where it
    differs), both compiles' verification, and one reason per site left unfused."""
    lines = ["| export | arch | variant | opset | attention fused/found | norms fused/found | verify -O2 / -O3 "
             "| misses (one reason per unfused site) |", "|---|---|---|---:|---:|---:|---|---|"]
    for row in rows:
        x, meta = row["export"], row["meta"]
        head = f"| {x.name} | {x.arch.name} | {x.variant} | {x.opset} |"
        if "failed" in meta:
            f = meta["failed"]
            lines.append(f"{head} | | export failed ({f['stage']}) | {_cell(f['error'], 300)} |")
            continue
        if "skipped" in meta:
            lines.append(f"{head} | | skipped | {_cell(meta['skipped'], 300)} |")
            continue
        o2, o3 = row[(2, "cpu")], row[(3, "cuda")]
        cells = []
        for fam in ("attention", "norm"):
            a2, a3 = _ratio(o2, fam), _ratio(o3, fam)
            if a2:
                cells.append(a2 + (f" (-O3 {a3})" if a3 and a3 != a2 else ""))
            else:
                cells.append(f"-O3 {a3}" if a3 else "")
        notes = []
        chk = meta.get("check", {})
        if chk and not chk.get("ok"):
            notes.append(f"export != torch (rel {chk['max_rel']:.1e})")
        for r, tag in ((o2, "-O2"), (o3, "-O3")):
            if r and r.get("error"):
                notes.append(f"{tag}: {r['error'][:200]}" + (f" @ {r['where']}" if r.get("where") else ""))
            if r and r.get("coverage_error"):
                notes.append(f"{tag} coverage: {r['coverage_error']}")
        for fam, ratio in ((o2 or {}).get("coverage_disagrees") or {}).items():
            notes.append(f"zoo counts {fam} {ratio} where the report's coverage says {_ratio(o2, fam)}")
        notes += _misses(o2 if o2 and o2.get("coverage") else o3)
        status = " / ".join(_status(r) for r in (o2, o3))
        lines.append(f"{head} {cells[0]} | {cells[1]} | {status} | {_cell('; '.join(notes), 700)} |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    n = len(rows)
    failed = [r for r in rows if "failed" in r["meta"]]
    skipped = [r for r in rows if "skipped" in r["meta"]]
    compiled = [r for r in rows if "failed" not in r["meta"] and "skipped" not in r["meta"]]
    count = Counter(_status(r[c]) for r in compiled for c in COMPILES)
    unfused = [r["export"].name for r in compiled if ((r[(2, "cpu")] or {}).get("ops_after") or {}).get("Softmax")]
    return (f"{n} exports: {len(failed)} export failures, " + (f"{len(skipped)} skipped, " if skipped else "")
            + f"{len(compiled)} compiled twice; compile outcomes "
            + ", ".join(f"{k} {v}" for k, v in sorted(count.items())) + f"; Softmax left at -O2 in {len(unfused)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated globs on architecture or export names (e.g. 'gemma*,bert_*_ts')")
    ap.add_argument("--jobs", type=int, default=1, help="architectures processed at once (default 1)")
    ap.add_argument("--fresh", action="store_true", help="export again even where bench/out/zoo has the export")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not write the markdown report")
    ap.add_argument("--doc", type=Path, default=OUT / "zoo.md", help="markdown report (default bench/out/zoo/zoo.md)")
    ap.add_argument("--matrix", choices=MATRICES, default="default",
                    help="variant exports: default (as always); core (+ decoders: dynamo-raw, no position_ids); "
                         "full (+ every arch: opset 23, the other attention implementation, float16)")
    ap.add_argument("--markdown", type=Path, metavar="FILE",
                    help="also write the variant table (sites fused / found, misses) to FILE as markdown")
    ap.add_argument("--list", action="store_true", help="list the exports and exit")
    ap.add_argument("--report-only", action="store_true", help="render the saved results; run nothing")
    ap.add_argument("--compile-timeout", type=int, default=300, help="seconds per compile (default 300)")
    ap.add_argument("--export-timeout", type=int, default=300, help="seconds per export (default 300)")
    ap.add_argument("--child-export", nargs=2, metavar=("ARCH", "EXPORTS"), help=argparse.SUPPRESS)
    ap.add_argument("--child-compile", nargs="+", metavar="SRC LEVEL TARGET DST JSON", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_export:
        return _export_child(args.child_export[0], args.child_export[1].split(","), args.fresh, args.export_timeout)
    if args.child_compile:   # one or more compiles, five arguments each
        c = args.child_compile
        for src, level, target, dst, res in (c[i:i + 5] for i in range(0, len(c), 5)):
            _compile_child(src, int(level), target, dst, res)
        return 0

    xs = select(args.only, args.matrix)
    if not xs:
        ap.error(f"--only {args.only!r} matches nothing (see --list)")
    if args.list:
        for x in xs:
            print(f"{x.name:40} opset {x.opset:2}  {x.arch.model_cls} ({x.exporter}, {x.attn}, {x.dtype}"
                  + (", nopos" if not x.positions else "") + (", static" if x.arch.static else "")
                  + f")  {x.arch.notes}")
        print(f"{len(xs)} exports")
        return 0
    started = time.time()
    if not args.report_only:
        groups: dict[str, list[Export]] = {}
        for x in xs:
            groups.setdefault(x.arch.name, []).append(x)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for fut in [pool.submit(sweep_arch, ARCH_BY_NAME[k], v, args) for k, v in groups.items()]:
                fut.result()
    rows = load_results(xs)
    table = render(rows)
    coverage = render_coverage(rows)
    text = summary(rows)
    print()
    print(table)
    print()
    print(coverage)
    print()
    print(text + (f" ({time.time() - started:.0f} s)" if not args.report_only else ""))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"# onnxc model-zoo variants (--matrix {args.matrix}"
                                 + (f", --only {args.only}" if args.only else "") + ")\n\n"
                                 + f"{text}\n\n{coverage}\n")
        print(f"wrote {args.markdown}")
    if not args.no_doc:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run([*git, "status", "--short", "--untracked-files=no"], capture_output=True, text=True,
                               check=False).stdout.splitlines()
        doc = [f"# onnxc model-zoo sweep (rendered {time.strftime('%Y-%m-%d %H:%M')}, onnxc at {head.stdout.strip()}"
               + (f" + {len(dirty)} modified files" if dirty else "") + ")", "", text, "", table, "",
               "## Sites fused / found per variant", "", coverage, ""]
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text("\n".join(doc))
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
