"""The `onnxc` command line: a thin shell over onnxc.driver.

Exit codes: 0 ok, 1 verification failed, 2 usage error, 3 invalid or unsafe input, 4 internal error.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, InvalidModelError, OnnxcError,
                     UsageError, VerificationError, WriteError, first_line)

# Lines are never wrapped or cut, and text is never read as markup: file, value and pass names may hold brackets.
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
out = Console(highlight=False, soft_wrap=True, markup=False)


def _fail(exc: OnnxcError) -> None:
    err.print(f"[bold red]onnxc: error:[/] {escape(exc.message)}", markup=True, soft_wrap=True)
    sys.exit(exc.exit_code)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so every `finally` (staged output, scratch folders) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


class Interrupted(BaseException):
    """Ctrl-C inside a command, carried past click (which would print a blank line and raise Abort)."""


class _Group(click.Group):
    """Turns every error into one line and a documented exit code."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted() from None

    def main(self, *args, **kwargs):  # type: ignore[override]
        kwargs["standalone_mode"] = False
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            rv = super().main(*args, **kwargs)
        except OnnxcError as exc:
            _fail(exc)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:     # click's wrapping of Ctrl-C (KeyboardInterrupt) and of EOF at a prompt
            err.print("onnxc: interrupted; nothing was written", markup=False)
            sys.exit(EXIT_INTERRUPTED)
        except Interrupted:
            err.print("onnxc: interrupted; nothing was written", markup=False)
            sys.exit(EXIT_INTERRUPTED)
        except Terminated:
            err.print("onnxc: terminated; nothing was written", markup=False)
            sys.exit(EXIT_TERMINATED)
        except click.ClickException as exc:
            err.print(f"onnxc: error: {exc.format_message()}", markup=False, soft_wrap=True)
            sys.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            err.print("onnxc: interrupted; nothing was written", markup=False)
            sys.exit(EXIT_INTERRUPTED)
        except MemoryError:
            err.print("onnxc: error: out of memory; nothing was written")
            sys.exit(EXIT_INTERNAL)
        except Exception as exc:  # a bug: still one line, still a documented code
            if os.environ.get("ONNXC_DEBUG"):
                raise
            err.print(f"onnxc: internal error: {type(exc).__name__}: {first_line(exc)} "
                      "(set ONNXC_DEBUG=1 for a traceback)",
                      markup=False, soft_wrap=True)
            sys.exit(EXIT_INTERNAL)
        if isinstance(rv, int):
            sys.exit(rv)
        return rv


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxc")
def main() -> None:
    """onnxc: a verified ONNX graph compiler for language models."""
    # Library warnings (e.g. onnx-ir's note on a dangling input) would duplicate our one-line errors.
    for name in ("onnx_ir", "onnxscript", "onnxruntime"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_model_file(path: Path) -> None:
    """A model path names a regular file (exit 3 before any other check or work)."""
    if not path.is_file():
        raise InvalidModelError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")


def _load_plugins(plugins: tuple[str, ...]) -> None:
    from . import pass_manager as pm
    for p in plugins:
        pm.load_plugin(p)


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-O", "level", type=click.IntRange(0, 3), default=2, show_default=True,
              help="Optimization level: 0 none, 1 cleanup, 2 fusions, 3 fusions + float16 compute on --target cuda "
                   "(on cpu, -O3 is -O2).")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output file (default: <stem>.onnxc.onnx beside the input).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write a JSON report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout (docs/report.md).")
@click.option("--passes", default=None, help="Explicit pipeline, e.g. 'fold-constants,fixpoint(a,b)'.")
@click.option("--disable", multiple=True, help="Disable a pass or rule (repeatable).")
@click.option("--plugin", multiple=True, type=click.Path(dir_okay=False), help="Python file registering passes.")
@click.option("--explain", "explain_rule", default=None, help="Print, per candidate site, why RULE did not match.")
@click.option("--no-verify", is_flag=True, help="Skip numeric verification.")
@click.option("--verify-inputs", type=click.Path(dir_okay=False), default=None, help=".npz of real inputs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for verification inputs.")
@click.option("--save-repro", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="When verification fails: save the model before the failing pass and a replay script in DIR.")
@click.option("--external-data/--no-external-data", default=None, help="Force weights into (or out of) a .data file.")
@click.option("--max-seq-len", type=int, default=None, help="Maximum sequence length for rotary caches.")
@click.option("--quantize", default=None, metavar="int4[:METHOD]|int8[:MODE]",
              help="Quantize linear layers to int4 MatMulNBits. int4: mixed precision (the lm_head, tied table "
                   "and the layers of largest int4 error at 8 bits, within 1.25x the all-int4 bytes); "
                   "int4:uniform: every layer int4; int4:METHOD, every layer int4 with METHOD rtn, lsq, hqq or "
                   "gptq (needs --calibration); int4:awq[:METHOD]: AWQ's per-channel scales from --calibration "
                   "folded into the norms before METHOD (default lsq). int8: weight-only 8 bits (MatMulNBits); "
                   "int8:dynamic: "
                   "DynamicQuantizeMatMul; int8:static[:minmax|percentile|entropy]: QDQ with activation ranges "
                   "from --calibration (default minmax).")
@click.option("--block-size", type=int, default=None, help="Quantization block size (power of 2 >= 16; default 32).")
@click.option("--symmetric/--asymmetric", default=None, help="Symmetric (no zero points) or asymmetric (default).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="Keep in float the layers whose node or weight name matches this glob (repeatable).")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None,
              help="Model inputs (.npz, arrays named after graph inputs; NAME/0, NAME/1, ... for several "
                   "batches) for int4:gptq, int4:awq and int8:static.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits accuracy_level (default 4 on cpu: int8 compute; 0 on cuda).")
@click.option("--io-fp16", is_flag=True, help="fp16 graph inputs and outputs (--target cuda).")
@click.option("--approximate-gelu", is_flag=True, help="Allow erf GELU to become the tanh approximation (FastGelu).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or tables (the 'wrote ...' line stays).")
@click.option("-v", "--verbose", is_flag=True, help="Also the notes of passes that found nothing to do.")
def compile_cmd(model: Path, level: int, target: str, output: Path | None, report: Path | None, passes: str | None,
                disable: tuple[str, ...], plugin: tuple[str, ...], explain_rule: str | None, no_verify: bool,
                verify_inputs: str | None, seed: int, save_repro: Path | None, external_data: bool | None,
                max_seq_len: int | None,
                quantize: str | None, block_size: int | None, symmetric: bool | None, exclude: tuple[str, ...],
                calibration: str | None, accuracy_level: int | None, io_fp16: bool, approximate_gelu: bool,
                quiet: bool, verbose: bool, as_json: bool = False) -> int:
    """Compile MODEL and write a verified, optimized model."""
    from . import driver

    from . import ir as irio

    if io_fp16 and target != "cuda":
        raise UsageError("--io-fp16 needs --target cuda (the cpu target keeps float32 compute and I/O)")
    _load_plugins(plugin)
    if explain_rule is not None:
        return _explain(model, explain_rule, level, target, passes, disable)
    if output is None:
        output = model.with_name(model.name[:-5] + ".onnxc.onnx" if model.name.endswith(".onnx")
                                 else model.name + ".onnxc.onnx")
    _check_model_file(model)
    irio.check_writable(output, "output")             # before any work: a bad place fails now, not after it
    if report is not None:
        irio.check_writable(report, "--report", suffixes=(".tmp0000000",))
        if report.absolute() in (output.absolute(), model.absolute()):
            raise UsageError(f"--report {report} is the {'output' if report.absolute() == output.absolute() else 'input'}"
                             " model")
    options = {}
    if max_seq_len is not None:
        options["max_seq_len"] = max_seq_len
    if io_fp16:
        options["io_fp16"] = True
    if approximate_gelu:
        options["approximate_gelu"] = True
    options.update(_quantize_options(quantize, block_size, symmetric, exclude, calibration, accuracy_level))

    # On a terminal a status line says what runs now (the passes, then saving and verification, which on a large
    # model take most of the time); piped output gets the per-pass lines only.
    status = err.status("loading and checking the model") if not quiet and err.is_terminal else nullcontext()

    def progress(rec) -> None:
        if not quiet:
            counts = ", ".join(f"{k}={v}" for k, v in rec.counts.items())
            err.print(f"  {rec.name:<22} {rec.seconds * 1000:8.1f} ms  nodes={rec.nodes_after:<7} {counts}",
                      markup=False, soft_wrap=True)
            if hasattr(status, "update"):
                status.update(f"passes (done: {rec.name}); then saving and verifying")

    if not quiet:
        err.print(f"onnxc {__version__}: compiling {model} at -O{level} for {target}", markup=False)
    with status:
        try:
            result = driver.compile(model, level, target, output=output, passes=passes, disable=disable,
                                    verify=not no_verify, verify_inputs=verify_inputs, seed=seed, options=options,
                                    external_data=external_data, progress=progress, save_repro=save_repro)
        except VerificationError as exc:     # the report says what failed and which pass broke the model
            if report is not None and getattr(exc, "report", None):
                _write_json_atomic(report, exc.report)
            raise
    rep = result.report
    if report is not None:
        _write_json_atomic(report, rep)
    if as_json:
        click.echo(json.dumps(rep, indent=2, default=str))
    if not quiet:
        _print_summary(rep, verbose)
    else:
        err.print(f"wrote {', '.join(rep['written'])}", markup=False)
    return 0


def _quantize_options(quantize: str | None, block_size: int | None, symmetric: bool | None,
                      exclude: tuple[str, ...], calibration: str | None, accuracy_level: int | None) -> dict:
    """--quantize and its companions as options (checked by the quantize pass before anything runs)."""
    given = {"--block-size": block_size, "--symmetric/--asymmetric": symmetric, "--exclude": exclude or None,
             "--calibration": calibration, "--accuracy-level": accuracy_level}
    if quantize is None:
        stray = [k for k, v in given.items() if v is not None]
        if stray:
            raise UsageError(f"{stray[0]} needs --quantize")
        return {}
    opts = {"quantize": quantize, "block_size": block_size, "symmetric": symmetric,
            "exclude": list(exclude) or None, "calibration": calibration, "accuracy_level": accuracy_level}
    return {k: v for k, v in opts.items() if v is not None}


def _explain(model: Path, name: str, level: int, target: str, passes: str | None,
             disable: tuple[str, ...]) -> int:
    """Run the pipeline up to the pass that owns the rule (or up to the named pass), then report each candidate site:
    for a rule, what matched and the deepest reason each other site did not; for a pass, what each of its rules
    says, then what the pass itself fired and noted when it runs there."""
    from . import driver, pass_manager as pm, pipeline, rules
    from . import ir as irio

    owners, registered, parts = pm.all_rules(), pm.registered_passes(), pm.all_parts()
    if name not in owners and name not in registered and name not in parts:
        raise UsageError(f"unknown pass, rule or part '{name}'" + rules.suggest(name, [*registered, *owners, *parts]))
    owner = owners[name][0] if name in owners else parts[name][0] if name in parts else registered[name]
    ir_model = irio.load(model)
    driver.check_input(ir_model)
    ctx = pm.PassContext(level=level, target=target)
    chosen = pm.flatten(pipeline.build_pipeline(ctx, passes, disable))
    before = []
    for p in chosen:
        if p.name == owner.name:
            break
        before.append(p)
    else:
        err.print(f"note: '{owner.name}' is not in the -O{level} {target} pipeline; explaining it after the whole "
                  f"pipeline", markup=False)
    pm.PassManager(before).run(ir_model, ctx)
    explained = [owners[name][1]] if name in owners else [] if name in parts else list(owner.rules())
    for part in [parts[name][1]] if name in parts else [] if name in owners else list(owner.parts()):
        rows = part.explain(ir_model, ctx)
        table = Table(title=f"{part.name}: {len(rows)} candidate sites before '{owner.name}' ({part.summary})")
        table.add_column("site", overflow="fold")
        table.add_column("result", overflow="fold")
        for site, why in rows:
            table.add_row(site, why)
        out.print(table)
    for rule in explained:
        rows = rules.explain(ir_model, rule)
        table = Table(title=f"{rule.name}: {len(rows)} candidate sites ({rule.root_op[1]} nodes) before "
                            f"'{owner.name}'")
        table.add_column("node", overflow="fold")
        table.add_column("result", overflow="fold")
        for node, why in rows:
            table.add_row(node, why)   # plain text: the console reads no markup
        out.print(table)
    if name in registered:
        ctx.notes.clear()
        ctx.details.clear()
        result = owner.run(ir_model, ctx)
        fired = ", ".join(f"{k}={v}" for k, v in result.counts.items()) or "nothing"
        out.print(f"{owner.name}: fired {fired}", markup=False)
        for line in [*ctx.notes, *ctx.details]:
            out.print(f"  {line}", markup=False)
    return 0


def _print_summary(rep: dict, verbose: bool = False) -> None:
    before, after = rep["ops_before"], rep["ops_after"]
    table = Table(title=f"{rep['nodes_before']} -> {rep['nodes_after']} nodes")
    table.add_column("op")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for op in sorted(set(before) | set(after), key=lambda o: (-max(before.get(o, 0), after.get(o, 0)), o)):
        b, a = before.get(op, 0), after.get(op, 0)
        table.add_row(op, str(b), str(a))
    err.print(table)
    v = rep["verification"]
    if v["status"] == "passed":
        worst = max((o["max_rel"] for s in v["scenarios"] for o in s["outputs"]), default=0.0)
        err.print(f"verified: {len(v['scenarios'])} scenarios, worst relative error {worst:.2e}", markup=False)
        if any("quantized_outputs" in s for s in v["scenarios"]):
            qw = max((o["max_rel"] for s in v["scenarios"] for o in s["quantized_outputs"]), default=0.0)
            layered = rep.get("quantization", {}).get("method") in ("int8:dynamic", "int8:static")
            err.print(f"verified: quantized model == its dequantized-weights twin "
                      f"({'layer by layer' if layered else 'accuracy_level 0'}), worst relative error {qw:.2e}",
                      markup=False)
    elif v.get("checks") == "local":
        loc = v["local"]
        skipped = f"; {loc['unchecked']} not checkable (see the report)" if loc["unchecked"] else ""
        err.print(f"verified locally: {loc['checked']} rewrites{skipped}; whole-model scenarios not run: "
                  f"{v['reason']}", markup=False)
    else:
        err.print(f"verification {v['status']}: {v.get('reason', '')}", markup=False)
    for note in v.get("notes", []) if v["status"] != "skipped" else []:     # scenarios shrunk to fit memory
        err.print(f"note: {note}", markup=False)
    kv = rep.get("kv_cache", {})
    if kv.get("status") == "verified":
        err.print(f"KV cache: past and present may share one buffer ({kv['pairs']} pairs, checked in "
                  f"{kv['runs']} runs)", markup=False)
    elif kv.get("status") == "differs":
        err.print(f"KV cache: must be copied each step: {kv['reason']}", markup=False)
    q = rep.get("quantization")
    if q:
        if q["method"].startswith("int8:") and q["method"] != "int8:weight":
            i8 = q.get("int8", {})
            what = (f"{q['dynamic_quantize_matmul']} DynamicQuantizeMatMul" if q["method"] == "int8:dynamic" else
                    f"{q['quantize_linear']} activations QDQ ({i8.get('calibration')} ranges, smoothing "
                    f"{i8.get('smooth')}, {sum(1 for x in i8.get('layers', []) if not x['int8'])} kept float by the "
                    f"error budget {i8.get('error_budget')})")
            err.print(f"quantized: {i8.get('weights', 0)} int8 weights, {what}; weights "
                      f"{q['weight_bytes_before'] / 2**20:.1f} -> {q['weight_bytes_after'] / 2**20:.1f} MiB",
                      markup=False)
        else:
            err.print(f"quantized: {q['matmul_nbits']} MatMulNBits, {q['gather_block_quantized']} "
                      f"GatherBlockQuantized ({q['method']}, block {q['block_size']}, "
                      f"{'symmetric' if q['symmetric'] else 'asymmetric'}, accuracy_level {q['accuracy_level']}); "
                      f"weights {q['weight_bytes_before'] / 2**20:.1f} -> {q['weight_bytes_after'] / 2**20:.1f} MiB",
                      markup=False)
        if q.get("layers"):
            high = [x["name"] for x in q["layers"] if x["bits"] != 4]
            err.print(f"mixed precision: {len(high)} of {len(q['layers'])} weights at 8 bits"
                      + (f" ({', '.join(high[:6])}{', ...' if len(high) > 6 else ''})" if high else ""), markup=False)
        s = q["error"].get("summary", {})
        if s:
            parts = [f"{k} {s[k]:.4f}" for k in ("cosine", "pooled_cosine", "top1_agreement") if k in s]
            err.print(f"quantization error vs input ('{s['output']}'): max abs {s['max_abs']:.3g}, relative "
                      f"{s['max_rel']:.3g}" + (", " + ", ".join(parts) if parts else ""), markup=False)
    from . import coverage

    sizes = rep.get("sizes", {})
    if sizes.get("input") and sizes.get("output"):
        i, o = sizes["input"], sizes["output"]
        err.print(f"size: model {_mib(i['model'])} -> {_mib(o['model'])}, data {_mib(i['data'])} -> "
                  f"{_mib(o['data'])}")
        if o["model"] + o["data"] > i["model"] + i["data"]:
            err.print(f"warning: the output is larger than the input ({_mib(o['model'] + o['data'])} against "
                      f"{_mib(i['model'] + i['data'])})")
    for line in coverage.lines(rep["coverage"]) if "coverage" in rep else []:
        err.print(line, markup=False)
    shown = {m["site"] for c in rep.get("coverage", {}).values() for m in c["misses"]}
    for note in rep["notes"]:
        # an attention miss is on its coverage line; a site one fusion refused and another took is under -v
        site = coverage.noted_miss(note)[0]
        if site is None or site not in shown and (verbose or "coverage" not in rep):
            err.print(f"note: {note}", markup=False)
    for line in rep.get("details", []) if verbose else []:
        err.print(f"detail: {line}", markup=False)
    err.print(f"wrote {', '.join(rep['written'])} in {rep['seconds']['total']:.2f} s", markup=False)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"cannot write the report {path}: {exc.strerror or exc}") from None


@main.command("passes")
@click.option("--plugin", multiple=True, type=click.Path(dir_okay=False))
@click.option("--rules", "show_rules", is_flag=True, help="Also list each pass's rules.")
@click.option("--json", "as_json", is_flag=True, help="Passes and their rules as JSON.")
@click.option("--markdown", is_flag=True,
              help="The catalogue as Markdown tables (the generated part of docs/passes.md).")
@click.option("--pipeline", "show_pipeline", is_flag=True,
              help="Print the pipeline -O and --target run, one pass a line, declared passes in their places.")
@click.option("-O", "level", type=click.IntRange(0, 3), default=2, show_default=True, help="With --pipeline.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="With --pipeline.")
def passes_cmd(plugin: tuple[str, ...], show_rules: bool, as_json: bool, markdown: bool, show_pipeline: bool = False,
               level: int = 2, target: str = "cpu") -> int:
    """List registered passes: name, level, targets, summary. Names are never cut: the summary wraps instead, and
    piped output is one line per pass or rule, tab-separated."""
    from . import pass_manager as pm, pipeline  # noqa: F401  (pipeline registers built-ins)

    _load_plugins(plugin)
    passes = pm.registered_passes()
    if markdown or show_pipeline:
        from . import passdoc

        click.echo(passdoc.pipeline_text(level, target) if show_pipeline else passdoc.render(passes), nl=False)
        return 0
    if as_json:
        out.print(json.dumps([{"name": name, "level": p.level, "targets": list(p.targets), "summary": p.summary,
                               "rules": [{"name": r.name, "summary": r.summary} for r in p.rules()],
                               "parts": [{"name": x.name, "summary": x.summary, "can_disable": x.can_disable}
                                         for x in p.parts()]}
                              for name, p in passes.items()], indent=1))
        return 0
    rows = []
    for name, p in passes.items():
        rows.append((name, f"-O{p.level}", ",".join(p.targets), p.summary))
        if show_rules:
            rows += [(f"  {r.name}", "", "", r.summary) for r in p.rules()]
            rows += [(f"  {x.name}", "", "", f"(part) {x.summary}") for x in p.parts()]
    if not out.is_terminal:
        for row in rows:
            click.echo("\t".join(row).rstrip())
        return 0
    table = Table()
    for col in ("pass", "level", "targets"):
        table.add_column(col, no_wrap=True)
    table.add_column("summary", overflow="fold")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    return 0


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(model: Path, as_json: bool) -> int:
    """Show opsets, op histogram, sizes, inputs and outputs of MODEL."""
    from . import driver
    from . import ir as irio

    m = irio.load(model)
    info = {
        "file": str(model),
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name or ''} {m.producer_version or ''}".strip(),
        "opsets": dict(sorted(m.opset_imports.items())),
        "nodes": sum(1 for _ in m.graph),
        "initializers": len(m.graph.initializers),
        "weight_bytes": irio.weight_bytes(m),
        "external_data": irio.uses_external_data(m),
        "inputs": [_sig(v) for v in m.graph.inputs],
        "outputs": [_sig(v) for v in m.graph.outputs],
        "ops": driver.op_histogram(m),
    }
    if as_json:
        out.print_json(json.dumps(info))
        return 0
    out.print(f"{model}: ir_version {info['ir_version']}, producer '{info['producer']}', opsets {info['opsets']}")
    out.print(f"{info['nodes']} nodes, {info['initializers']} initializers, "
              f"{info['weight_bytes'] / 2**20:.2f} MiB of weights" + (" (external data)" if info['external_data'] else ""))
    io = Table(title="inputs and outputs")
    for col in ("kind", "name", "type", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            io.add_row(kind[:-1], s["name"], s["dtype"], str(s["shape"]))
    out.print(io)
    ops = Table(title="ops")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["ops"].items():
        ops.add_row(op, str(n))
    out.print(ops)
    return 0


def _sig(v) -> dict:
    shape = None if v.shape is None else [d if isinstance(d, int) else d.value for d in v.shape]
    return {"name": v.name, "dtype": v.dtype.name if v.dtype is not None else "?", "shape": shape}


@main.command("verify")
@click.argument("reference", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("candidate", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the generated inputs.")
@click.option("--inputs", "--verify-inputs", "verify_inputs", type=click.Path(dir_okay=False), default=None,
              help=".npz of real inputs (arrays named after the graph inputs).")
@click.option("--rtol", type=float, default=None, help="Relative tolerance (default: by dtype, as compile).")
@click.option("--atol", type=float, default=None,
              help="Absolute tolerance (default: by dtype, a fraction of the reference's largest magnitude).")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None)
def verify_cmd(reference: Path, candidate: Path, seed: int, verify_inputs: str | None, rtol: float | None,
               atol: float | None, report: Path | None) -> int:
    """Check that CANDIDATE computes what REFERENCE computes (exit 1 if not).

    Tolerances are compile's, by the precision the candidate computes in (float16 for -O3 --target cuda). A
    quantized candidate's error is reported without failing unless --rtol/--atol are given."""
    from . import ir as irio, verify as numeric
    from .errors import EXIT_VERIFY

    for p in (reference, candidate):
        _check_model_file(p)
    if report is not None:
        irio.check_writable(report, "--report", suffixes=(".tmp0000000",))
    ref = irio.load(reference)
    cand = irio.load(candidate)
    if [v.name for v in ref.graph.outputs] != [v.name for v in cand.graph.outputs]:
        raise InvalidModelError("the two models have different outputs")
    feeds = numeric.load_inputs(verify_inputs) if verify_inputs else None
    precision = numeric.compute_precision(cand)
    quantized = numeric.is_quantized(cand) and rtol is None and atol is None
    rep = numeric.verify_files(reference, candidate, ref, seed=seed, inputs=feeds,
                               weight_bytes=max(irio.weight_bytes(ref), irio.weight_bytes(cand)),
                               tolerance_dtype=precision, rtol=rtol, atol=atol)
    if quantized and rep.status == "failed":
        rep.status, rep.reason = "reported", "quantized candidate: errors reported, not judged (give --rtol/--atol)"
    if report is not None:
        _write_json_atomic(report, rep.to_dict())
    for sc in rep.scenarios:
        for o in sc["outputs"]:
            verdict = "ok" if o["ok"] else ("differs" if quantized else "MISMATCH")
            out.print(f"{sc['name']:<8} {o['name']:<28} max_abs={o['max_abs']:.3g} max_rel={o['max_rel']:.3g} "
                      f"passes at tol>={o['min_tol']:.3g} (rtol={o['rtol']:.3g} atol={o['atol']:.3g}) {verdict}")
    tolerances = (f"--rtol {rtol} --atol {atol}" if rtol is not None or atol is not None else
                  f"{precision or 'dtype'} tolerances")
    out.print(f"{rep.status} ({tolerances})" + (f": {rep.reason}" if rep.reason else ""))
    return EXIT_VERIFY if rep.status == "failed" else 0


# ---------------------------------------------------------------------------------------------------- fuzz
@main.command("fuzz")
@click.option("--pass", "pass_name", default=None, metavar="NAME", help="Fuzz the rules of this pass.")
@click.option("--all", "all_passes", is_flag=True, help="Fuzz the rules of every pass that has pattern rules.")
@click.option("--rule", default=None, metavar="NAME", help="Only this rule (of --pass or --all).")
@click.option("--examples", type=int, default=100, show_default=True, help="Valid graphs per rule.")
@click.option("--seed", type=int, default=0, show_default=True, help="hypothesis seed (a run is replayed by it).")
@click.option("--plugin", multiple=True, type=click.Path(dir_okay=False), help="Python file registering passes.")
def fuzz_cmd(pass_name: str | None, all_passes: bool, rule: str | None, examples: int, seed: int,
             plugin: tuple[str, ...]) -> int:
    """Check rules on random graphs built from their patterns: IR verifier, outputs in onnxruntime, a second run
    changes nothing, the rule fires exactly where its match succeeds. Exit 1 on a failure (shrunk and printed
    with the command that replays it)."""
    from . import fuzz
    from .errors import EXIT_VERIFY

    _load_plugins(plugin)
    chosen = fuzz.select(pass_name, all_passes, rule)
    results = fuzz.run(chosen, examples, seed, progress=lambda line: out.print(line, markup=False))
    failed = [r for r in results if r.failure]
    graphs = sum(r.graphs for r in results)
    fired = sum(1 for r in results if r.fired)
    out.print(f"{len(results)} rules, {graphs} graphs, {fired} rules fired at least once, seed {seed}: "
              + (f"{len(failed)} FAILED" if failed else "all checks passed"), markup=False)
    return EXIT_VERIFY if failed else 0


# ---------------------------------------------------------------------------------------------------- bench
@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--provider", multiple=True, help="cpu, cuda or both, comma-separated (default: cpu, and cuda "
              "where onnxruntime has it).")
@click.option("--scenario", multiple=True, help="prefill:N or decode:N (repeatable; default prefill:128 and "
              "decode:256).")
@click.option("--batch", multiple=True, help="Batch sizes, comma-separated (default 1).")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own choice).")
@click.option("--runs", type=int, default=50, show_default=True, help="Timed runs per model and mode.")
@click.option("--warmup", type=int, default=5, show_default=True,
              help="Untimed rounds first (every model and mode once each).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the generated inputs.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the table (and every sample) as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw latency distributions and ratios (.png, .svg, .pdf; needs onnxc[plot]).")
def bench_cmd(models: tuple[Path, ...], provider: tuple[str, ...], scenario: tuple[str, ...], batch: tuple[str, ...],
              threads: int | None, runs: int, warmup: int, seed: int, json_path: Path | None,
              plot_path: Path | None) -> int:
    """Time MODELS interleaved in one process: latency, tokens/s, session time and memory, with the ratio of
    each to the first model (docs/bench.md)."""
    from . import benchmark
    from . import ir as irio

    for p in models:
        _check_model_file(p)
    if plot_path is not None:
        benchmark.check_plot_extra()
        if plot_path.suffix.lower() not in benchmark.PLOT_SUFFIXES:
            raise UsageError(f"--plot {plot_path}: the name must end in {', '.join(benchmark.PLOT_SUFFIXES)}")
    for path, what in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            irio.check_writable(path, what, suffixes=(".tmp0000000",))
            if path.absolute() in {m.absolute() for m in models}:
                raise UsageError(f"{what} {path} is an input model")
    result = benchmark.bench(models, providers=provider or None, scenarios=scenario or None, batches=batch or None,
                             threads=threads, runs=runs, warmup=warmup, seed=seed,
                             progress=lambda line: err.print(line, markup=False))
    for s in result["skipped"]:
        where = (f"{s['model']} {s['scenario']} batch {s['batch']} on {s['provider']}" if "model" in s
                 else s["provider"])
        err.print(f"skipped: {where}: {s['reason']}", markup=False)
    out.print(f"{runs} runs after {warmup} warm-up, interleaved; ratio = p50 / model [0]'s p50 in the same mode",
              markup=False)
    for line in benchmark.table_text(result):
        out.print(line, markup=False)
    for b in result["best"]:
        ratio = "" if b["ratio"] is None else f", {b['ratio']:.2f}x model [0]'s fastest"
        out.print(f"[{b['model_index']}] {b['provider']} {b['scenario']} batch {b['batch']}: fastest {b['mode']} "
                  f"{b['p50_ms']:.3f} ms{ratio}", markup=False)
    for s in result["sessions"]:
        kv = s["kv_cache"]
        out.print(f"[{s['model_index']}] {s['model']} on {s['provider']}: session {s['session_s'] * 1000:.0f} ms, "
                  f"holds {s['session_rss_mib']:.1f} MiB, peak {s['peak_rss_mib']:.1f} MiB; in-place KV cache "
                  f"{kv['status']}" + (f" ({kv['reason']})" if kv.get("reason") else ""), markup=False)
    if json_path is not None:
        benchmark.write_json(result, json_path)
        err.print(f"wrote {json_path}", markup=False)
    if plot_path is not None:
        benchmark.plot(result, plot_path)
        err.print(f"wrote {plot_path}", markup=False)
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
