"""Index ops (Gather, GatherElements, ScatterND, CumSum, ArgMax/ArgMin): forward against
onnxruntime, backward against torch, out-of-range indices as clear errors."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")

from opcheck import check_backward, check_forward, ort_run
from pyedge import _core

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]
I64 = np.int64


def rand(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def run(op, inputs, attrs=None, opset=17, **kw):
    return _core.run_op(op, list(inputs), dict(attrs or {}), opset=opset, **kw)[0]


# ---------------------------------------------------------------- Gather

@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_all_dtypes(dtype):
    x = rand((5, 4, 3), dtype)
    check_forward("Gather", [x, np.array([[0, 4], [-1, 2]], I64)])
    check_forward("Gather", [x, np.array([3, -4, 0], np.int32)], {"axis": 1})
    check_forward("Gather", [x, np.array(2, I64)], {"axis": -1})


def test_gather_shapes():
    x = rand((7,))
    check_forward("Gather", [x, np.array([[1, 2, 3], [6, 0, -7]], I64)])
    check_forward("Gather", [x, np.array(-1, I64)])
    check_forward("Gather", [rand((3, 4)), np.zeros((0,), I64)], {"axis": 1})
    # indices that are not known at plan time (e.g. token ids fed at run time)
    check_forward("Gather", [rand((50, 16)), np.array([[3, 49, 3, 0]], I64)],
                  const_inputs=[])


def test_gather_embedding_backward_accumulates():
    table = rand((10, 256))
    ids = np.array([[1, 3, 1, -1], [3, 3, 0, 9]], I64)  # repeats and a negative index
    check_backward("Gather", [table, ids], lambda t, i: t[i % 10])
    small = rand((10, 4))  # narrow rows: partitioned by outer rows / serial
    check_backward("Gather", [small, ids], lambda t, i: t[i % 10])


def test_gather_backward_other_axes():
    x = rand((4, 6, 5))
    idx = np.array([[0, 5], [5, -1]], I64)
    check_backward("Gather", [x, idx], lambda t, i: t[:, i % 6], {"axis": 1})
    check_backward("Gather", [x, np.array([4, 4, 0], I64)], lambda t, i: t[..., i],
                   {"axis": 2})
    wide = rand((2, 3, 300))
    check_backward("Gather", [wide, np.array([2, 2, 1], I64)], lambda t, i: t[:, i],
                   {"axis": 1})


def test_gather_backward_large_embedding():
    table = rand((1000, 384))
    ids = np.random.default_rng(1).integers(0, 1000, (8, 64)).astype(I64)
    ids[0, :10] = 7  # heavy repetition
    check_backward("Gather", [table, ids], lambda t, i: t[i])


def test_gather_out_of_range_is_an_error():
    x = rand((5, 3))
    with pytest.raises(_core.PyedgeError, match="Gather node 'test'.*index 5.*size 5"):
        run("Gather", [x, np.array([0, 5], I64)])
    # only known at run time
    with pytest.raises(_core.PyedgeError, match="Gather node 'test'.*index -7"):
        run("Gather", [x, np.array([0, -7], I64)], const_inputs=[])
    with pytest.raises(_core.PyedgeError, match="indices must be int64 or int32"):
        run("Gather", [x, np.array([0.0], np.float32)])


# ---------------------------------------------------------------- GatherElements

@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_elements_all_dtypes(dtype):
    x = rand((3, 4), dtype)
    idx = np.array([[0, 3, 1, -1], [2, 2, 0, 0], [1, 0, 3, 2]], I64)
    check_forward("GatherElements", [x, idx], {"axis": 1})


def test_gather_elements():
    x = rand((4, 5, 6))
    rng = np.random.default_rng(2)
    for axis in (0, 1, 2, -1):
        ishape = list(x.shape)
        ishape[axis] = 3
        idx = rng.integers(-x.shape[axis], x.shape[axis], ishape).astype(I64)
        check_forward("GatherElements", [x, idx], {"axis": axis})
        check_backward("GatherElements", [x, idx],
                       lambda t, i, a=axis: torch.gather(t, a, i % t.shape[a]), {"axis": axis})
    # indices smaller than data outside the axis
    idx = rng.integers(0, 5, (2, 7, 3)).astype(np.int32)
    check_forward("GatherElements", [x, idx], {"axis": 1})
    check_backward("GatherElements", [x, idx.astype(I64)],
                   lambda t, i: torch.gather(t, 1, i), {"axis": 1})
    # few outer rows, wide inner: partitioned by columns
    w = rand((2, 3, 400))
    idx = rng.integers(0, 3, (2, 5, 400)).astype(I64)
    check_backward("GatherElements", [w, idx], lambda t, i: torch.gather(t, 1, i), {"axis": 1})
    with pytest.raises(_core.PyedgeError, match="GatherElements node 'test'.*index 4"):
        run("GatherElements", [rand((2, 4)), np.array([[0], [4]], I64)], {"axis": 1})


# ---------------------------------------------------------------- ScatterND

@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_nd_all_dtypes(dtype):
    x = rand((4, 3, 2), dtype)
    idx = np.array([[1, 2], [-1, 0]], I64)
    upd = rand((2, 2), dtype, seed=5)
    check_forward("ScatterND", [x, idx, upd], const_inputs=[])


def test_scatter_nd():
    x = rand((5, 4))
    check_forward("ScatterND", [x, np.array([[3], [0]], I64), rand((2, 4), seed=1)])
    check_forward("ScatterND", [x, np.array([[[1, 1]], [[4, 3]]], I64), rand((2, 1), seed=1)])
    for red in ("add", "mul"):
        check_forward("ScatterND", [x, np.array([[1], [1], [2]], I64), rand((3, 4), seed=1)],
                      {"reduction": red}, opset=16)
    for red in ("max", "min"):
        check_forward("ScatterND", [x, np.array([[1], [1], [2]], I64), rand((3, 4), seed=1)],
                      {"reduction": red}, opset=18)
    with pytest.raises(_core.PyedgeError, match="ScatterND node 'test'.*index 5"):
        run("ScatterND", [x, np.array([[5]], I64), rand((1, 4))])


# ---------------------------------------------------------------- CumSum

def test_cumsum():
    x = rand((3, 70, 5))
    for axis in (0, 1, 2, -1):
        for excl in (0, 1):
            for rev in (0, 1):
                attrs = {"exclusive": excl, "reverse": rev}
                check_forward("CumSum", [x, np.array(axis, I64)], attrs)
    for dt in (np.float64, np.int64, np.int32):
        check_forward("CumSum", [rand((4, 6), dt), np.array(1, np.int32)], {"reverse": 1})
    check_forward("CumSum", [rand((2, 200)), np.array(0, I64)], {"exclusive": 1})


def test_cumsum_backward():
    x = rand((3, 7, 130))

    def ref(a, axis, excl, rev):
        if rev:
            a = a.flip(axis)
        y = a.cumsum(axis)
        if excl:
            y = y - a
        return y.flip(axis) if rev else y

    for axis in (1, 2):
        for excl in (0, 1):
            for rev in (0, 1):
                check_backward("CumSum", [x, np.array(axis, I64)],
                               lambda a, _, ax=axis, e=excl, r=rev: ref(a, ax, e, r),
                               {"exclusive": excl, "reverse": rev})


# ---------------------------------------------------------------- ArgMax / ArgMin

@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
def test_argmax_argmin(op):
    x = rand((4, 6, 70))
    for axis in (0, 1, 2, -2):
        for keep in (0, 1):
            check_forward(op, [x], {"axis": axis, "keepdims": keep})
    ties = np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32)
    for last in (0, 1):
        check_forward(op, [ties], {"axis": 1, "select_last_index": last})
        check_forward(op, [ties.T.copy()], {"axis": 0, "select_last_index": last})
    for dt in (np.float64, np.int64, np.int32, np.uint8):
        check_forward(op, [rand((5, 7), dt)], {"axis": 1})


def test_argmax_bool():
    x = rand((5, 7), np.bool_)
    np.testing.assert_array_equal(run("ArgMax", [x], {"axis": 1, "keepdims": 0})[0],
                                  np.argmax(x, axis=1))


def test_gather_indices_fed_at_run_time_in_a_graph():
    """Token ids as a graph input: checked on every run, a bad id is a PyedgeError."""
    from onnx import TensorProto, helper, numpy_helper

    from pyedge.session import TrainingSession

    table = rand((10, 4))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("Reshape", ["emb", "flat"], ["r"]),
             helper.make_node("Transpose", ["r"], ["out"], perm=[1, 0])]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 6])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([6, 4], I64), "flat")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    sess = TrainingSession(model.SerializeToString(), loss=None)
    ids = np.array([[1, 2, 3], [9, -1, 0]], I64)
    out = sess.run({"ids": ids})["out"]
    np.testing.assert_array_equal(out, table[ids % 10].reshape(6, 4).T)
    with pytest.raises(_core.PyedgeError, match="Gather node 'embed'.*index 10"):
        sess.run({"ids": np.array([[1, 2, 3], [9, 10, 0]], I64)})
    with pytest.raises(_core.PyedgeError, match="index -11"):
        sess.run({"ids": np.array([[1, 2, 3], [9, -11, 0]], I64)})
