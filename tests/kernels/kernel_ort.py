"""Run a single ONNX node in onnxruntime's CPU EP and compare it with a reference kernel."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import helper, numpy_helper

MS = "com.microsoft"

# (rtol, atol) per output dtype
TOL = {
    np.dtype(np.float64): (1e-7, 1e-9),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float16): (2e-3, 2e-3),
}


def node_model(op_type, inputs, attrs=None, n_outputs=1, domain=MS, const=(), opset=18):
    """A one-node model: inputs become graph inputs, or initializers when their index is in `const` (int4
    tensors are always initializers: onnxruntime's Python feed has no int4). Returns (model bytes, feeds)."""
    names, graph_inputs, feeds, inits = [], [], {}, []
    for i, x in enumerate(inputs):
        if x is None:
            names.append("")
            continue
        name = f"in{i}"
        names.append(name)
        if i in const or x.dtype in (ml_dtypes.int4, ml_dtypes.uint4):
            inits.append(numpy_helper.from_array(x, name))
            continue
        elem = helper.np_dtype_to_tensor_dtype(x.dtype)
        graph_inputs.append(helper.make_tensor_value_info(name, elem, list(x.shape)))
        feeds[name] = x
    outs = [f"out{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names, outs, domain=domain, **(attrs or {}))
    graph = helper.make_graph([node], op_type, graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs],
                              initializer=inits)
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])
    return model.SerializeToString(), feeds


def run_ort(op_type, inputs, attrs=None, n_outputs=1, domain=MS, const=(), opset=18):
    """Outputs of the node computed by onnxruntime (CPU EP, graph optimizations off, one thread)."""
    model, feeds = node_model(op_type, inputs, attrs, n_outputs, domain, const, opset)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(actual, expected, rtol=None, atol=None, err_msg=""):
    """Same dtype and shape, and values within the dtype's tolerance."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{err_msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{err_msg}: shape {actual.shape} != {expected.shape}"
    r, a = TOL.get(actual.dtype, (0, 0))
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=r if rtol is None else rtol, atol=a if atol is None else atol, err_msg=err_msg)


def check(op_type, reference, inputs, attrs=None, n_outputs=1, domain=MS, outputs=None, const=(), opset=18, **tol):
    """Run the node in ORT and by `reference`; compare the outputs listed in `outputs` (default all)."""
    got = run_ort(op_type, inputs, attrs, n_outputs, domain, const, opset)
    ref = reference(*inputs, **(attrs or {}))
    ref = list(ref) if isinstance(ref, tuple) else [ref]
    for i in range(n_outputs) if outputs is None else outputs:
        assert_close(got[i], ref[i], err_msg=f"{op_type} output {i}", **tol)
    return got, ref


def rng(seed=0):
    return np.random.default_rng(seed)


def randn(r, *shape, dtype=np.float32, scale=1.0):
    return (r.standard_normal(shape) * scale).astype(dtype)
