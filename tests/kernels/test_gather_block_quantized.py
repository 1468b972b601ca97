"""GatherBlockQuantized reference against onnxruntime (CPU: uint8 with bits, int4, uint4 data)."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_ort import check, rng
from onnxc.kernels.gather_block_quantized import gather_block_quantized
from onnxc.kernels.matmul_nbits import dequantize, pack_bits, quantize_rtn


def packed_table(r, rows, cols, bits):
    codes = r.integers(0, 1 << bits, (rows, cols)).astype(np.uint8)
    return codes, pack_bits(codes, bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("cols", [64, 40])  # 40: the last block is partial
@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_gbq_uint8_matches_ort(bits, with_zp, block_size, cols, scale_dtype):
    r = rng(bits + block_size + cols)
    rows = 12
    _, data = packed_table(r, rows, cols, bits)
    k_blocks = -(-cols // block_size)
    scales = r.uniform(0.1, 2.0, (rows, k_blocks)).astype(scale_dtype)
    zp = None
    if with_zp:
        per = 8 // bits
        _, zp = packed_table(r, rows, -(-k_blocks // per) * per, bits)
    idx = np.array([[0, 11, 3], [-1, 5, 5]], np.int64)
    check("GatherBlockQuantized", gather_block_quantized, [data, idx, scales, zp],
          {"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1}, const=(0, 2, 3))


@pytest.mark.parametrize("dtype", [ml_dtypes.int4, ml_dtypes.uint4])
@pytest.mark.parametrize("with_zp", [False, True])
@pytest.mark.parametrize("axes", [(0, 1), (1, 0), (0, 0), (1, 1)])
def test_gbq_int4_matches_ort(dtype, with_zp, axes):
    """Default zero point is 0 for both int4 and uint4; any gather/quantize axis pair."""
    r = rng(7)
    lo, hi = (-8, 8) if dtype == ml_dtypes.int4 else (0, 16)
    data = r.integers(lo, hi, (32, 48)).astype(dtype)
    gather_axis, quantize_axis = axes
    shape = list(data.shape)
    shape[quantize_axis] = -(-shape[quantize_axis] // 16)
    scales = r.uniform(0.1, 2.0, shape).astype(np.float32)
    zp = r.integers(lo, hi, shape).astype(dtype) if with_zp else None
    idx = np.array([0, 31, -2, 7], np.int32)
    check("GatherBlockQuantized", gather_block_quantized, [data, idx, scales, zp],
          {"block_size": 16, "gather_axis": gather_axis, "quantize_axis": quantize_axis}, const=(2,))


def test_gbq_out_of_range_indices_give_zeros():
    r = rng(8)
    _, data = packed_table(r, 6, 32, 4)
    scales = r.uniform(0.1, 2.0, (6, 2)).astype(np.float32)
    idx = np.array([0, 6, -7, -6, 100], np.int64)
    got, _ = check("GatherBlockQuantized", gather_block_quantized, [data, idx, scales],
                   {"bits": 4, "block_size": 16}, const=(0, 2))
    assert not got[0][[1, 2, 4]].any() and got[0][[0, 3]].any()


def test_gbq_three_dimensional_table_matches_ort():
    r = rng(9)
    data = r.integers(-8, 8, (3, 32, 4)).astype(ml_dtypes.int4)
    scales = r.uniform(0.1, 2.0, (3, 2, 4)).astype(np.float32)
    for gather_axis in (0, 2):
        check("GatherBlockQuantized", gather_block_quantized, [data, np.array([[1, 0], [2, 1]], np.int64), scales],
              {"block_size": 16, "gather_axis": gather_axis, "quantize_axis": 1}, const=(2,))


@pytest.mark.parametrize("symmetric", [True, False])
def test_gbq_reads_a_matmul_nbits_weight_as_an_embedding(symmetric):
    """A tied embedding / lm_head: MatMulNBits' B (N, k_blocks, blob) viewed as (N, K/2) uint8 rows is a valid
    GatherBlockQuantized table with the same scales and zero points, and gathers rows of dequantize(B).T."""
    r = rng(10)
    vocab, hidden, block = 50, 96, 32
    emb = r.standard_normal((vocab, hidden)).astype(np.float32)
    b, s, z = quantize_rtn(emb.T, block, symmetric)  # weight of lm_head: (hidden, vocab)
    ids = r.integers(0, vocab, (2, 5)).astype(np.int64)
    _, ref = check("GatherBlockQuantized", gather_block_quantized, [b.reshape(vocab, -1), ids, s, z],
                   {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1}, const=(0, 2, 3))
    table = dequantize(b, s, z, K=hidden, N=vocab, bits=4, block_size=block).T
    np.testing.assert_allclose(ref[0], table[ids], rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 20), blocks=st.integers(1, 4), block_size=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from([2, 4, 8]), with_zp=st.booleans(), n_idx=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_gbq_property(rows, blocks, block_size, bits, with_zp, n_idx, seed):
    r = rng(seed)
    cols = blocks * block_size
    _, data = packed_table(r, rows, cols, bits)
    scales = r.uniform(0.1, 2.0, (rows, blocks)).astype(np.float32)
    per = 8 // bits
    zp = packed_table(r, rows, -(-blocks // per) * per, bits)[1] if with_zp else None
    idx = r.integers(-rows, rows, n_idx).astype(np.int64)
    check("GatherBlockQuantized", gather_block_quantized, [data, idx, scales, zp],
          {"bits": bits, "block_size": block_size}, const=(0, 2, 3))
