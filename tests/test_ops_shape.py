"""Shape ops (Reshape, Flatten, Squeeze, Unsqueeze, Shape, Size, ConstantOfShape, Constant,
Range) and layout ops (Transpose, Concat, Split, Slice, Tile, Pad, Trilu): forward against
onnxruntime for every dtype, backward against torch."""
import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")
from onnx import numpy_helper

from opcheck import check_backward, check_forward, ort_run
from pyedge import _core

DTYPES = [np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]
I64 = np.int64
BIG = np.iinfo(np.int64).max
SMALL = np.iinfo(np.int64).min


def rand(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def ints(*v):
    return np.array(v, dtype=I64)


def run(op, inputs, attrs=None, opset=17, **kw):
    return _core.run_op(op, list(inputs), dict(attrs or {}), opset=opset, **kw)[0]


# ---------------------------------------------------------------- reshape-like

@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_like_all_dtypes(dtype):
    x = rand((2, 3, 4), dtype)
    check_forward("Reshape", [x, ints(0, -1)])
    check_forward("Flatten", [x], {"axis": 2})
    check_forward("Squeeze", [x[:, :1], ints(1)], opset=13)
    check_forward("Unsqueeze", [x, ints(0, -1)], opset=13)


def test_reshape_variants():
    x = rand((2, 3, 4))
    check_forward("Reshape", [x, ints(4, -1, 3)])
    check_forward("Reshape", [x, ints(0, 0, 2, 2)])
    check_forward("Reshape", [x, ints(-1)])
    check_forward("Reshape", [rand((0, 3)), ints(3, 0)], {"allowzero": 1}, opset=14)
    check_forward("Reshape", [rand(()), ints(1, 1)])
    check_backward("Reshape", [x, ints(6, 4)], lambda a, s: a.reshape(6, 4))


def test_flatten_axes():
    x = rand((2, 3, 4, 5))
    for axis in (0, 1, 3, 4, -1, -4):
        check_forward("Flatten", [x], {"axis": axis}, opset=13)
    check_backward("Flatten", [x], lambda a: a.reshape(6, 20), {"axis": 2})


def test_squeeze_opsets():
    x = rand((1, 3, 1, 4, 1))
    check_forward("Squeeze", [x], opset=11)
    check_forward("Squeeze", [x], {"axes": [0, -1]}, opset=11)
    check_forward("Squeeze", [x], opset=13)
    check_forward("Squeeze", [x, ints(2, -5)], opset=13)
    check_forward("Squeeze", [x, ints()], opset=13)  # empty axes: all size-1 dims
    check_backward("Squeeze", [x, ints(0)], lambda a, ax: a.squeeze(0), opset=13)


def test_unsqueeze_opsets():
    x = rand((3, 4))
    check_forward("Unsqueeze", [x], {"axes": [0, 3]}, opset=11)
    check_forward("Unsqueeze", [x, ints(-1, 1)], opset=13)
    check_forward("Unsqueeze", [rand(()), ints(0)], opset=13)
    check_backward("Unsqueeze", [x, ints(1)], lambda a, ax: a.unsqueeze(1), opset=13)


def test_reshape_like_ops_alias_and_read_nothing():
    # Backward is a plain copy of the gradient, whatever the forward saw.
    x = rand((2, 6))
    g = rand((3, 4), seed=1)
    _, grads = _core.run_op("Reshape", [x, ints(3, 4)], {}, grad_outputs=[g])
    np.testing.assert_array_equal(grads[0], g.reshape(2, 6))


def test_reshape_errors():
    x = rand((2, 3, 4))
    with pytest.raises(_core.PyedgeError, match="cannot reshape .*2,3,4"):
        run("Reshape", [x, ints(5, -1)])
    with pytest.raises(_core.PyedgeError, match="more than one -1"):
        run("Reshape", [x, ints(-1, -1)])
    with pytest.raises(_core.PyedgeError, match="Reshape node 'test'.*cannot reshape"):
        run("Reshape", [x, ints(7, 3)])
    with pytest.raises(_core.PyedgeError, match="must be known when the plan is built"):
        run("Reshape", [x, np.array([6.0, 4.0], np.float32)])
    with pytest.raises(_core.PyedgeError, match="cannot squeeze axis"):
        run("Squeeze", [x, ints(1)], opset=13)


# ---------------------------------------------------------------- plan-time values

def test_shape_and_size():
    x = rand((2, 3, 4, 5))
    check_forward("Shape", [x])
    for start, end in [(1, None), (-2, None), (0, -1), (-10, 10), (3, 1)]:
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        check_forward("Shape", [x], attrs, opset=15)
    check_forward("Size", [x])
    check_forward("Shape", [rand((), np.int32)])
    check_forward("Size", [rand((0, 3), np.bool_)])


def test_plan_time_outputs_need_no_input_data():
    # Shape/Size of a float input that is not constant are still known at plan time.
    x = rand((2, 7))
    assert run("Shape", [x])[0].tolist() == [2, 7]
    assert run("Size", [x])[0] == 14


def test_constant_of_shape():
    check_forward("ConstantOfShape", [ints(2, 3)])
    check_forward("ConstantOfShape", [ints(0)])
    check_forward("ConstantOfShape", [ints()])
    for v in [np.array([2.5], np.float32), np.array([7], I64), np.array([True]),
              np.array([3], np.int32), np.array([1.5], np.float64)]:
        ours = run("ConstantOfShape", [ints(3, 2)], {"value": v})[0]
        ref = ort_run("ConstantOfShape", [ints(3, 2)],
                      {"value": numpy_helper.from_array(v)})[0]
        assert ours.dtype == ref.dtype
        np.testing.assert_array_equal(ours, ref)


def test_constant():
    cases = [
        ({"value": rand((2, 3))}, rand((2, 3))),
        ({"value": rand((4,), np.int64)}, rand((4,), np.int64)),
        ({"value_float": 1.5}, np.array(1.5, np.float32)),
        ({"value_int": -3}, np.array(-3, I64)),
        ({"value_ints": [1, 2, 3]}, ints(1, 2, 3)),
        ({"value_floats": [0.5, 2.0]}, np.array([0.5, 2.0], np.float32)),
    ]
    for attrs, ref in cases:
        ours = run("Constant", [], attrs)[0]
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(_core.PyedgeError, match="value"):
        run("Constant", [], {"value_string": "x"})


def test_range():
    for args in [(0, 10, 3), (10, 0, -3), (5, 5, 1), (-4, 7, 2), (0, -5, 1)]:
        for dt in (np.int64, np.int32):
            check_forward("Range", [np.array(a, dt) for a in args])
    for args in [(0.0, 1.0, 0.25), (2.5, -1.0, -0.7)]:
        for dt in (np.float32, np.float64):
            check_forward("Range", [np.array(a, dt) for a in args], const_inputs=[0, 1, 2])
    with pytest.raises(_core.PyedgeError, match="'limit' must be known"):
        run("Range", [np.array(0.0, np.float32), np.array(1.0, np.float32),
                      np.array(0.1, np.float32)], const_inputs=[0, 2])


# ---------------------------------------------------------------- transpose

@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_all_dtypes(dtype):
    x = rand((3, 5, 4, 6), dtype)
    for perm in ([0, 2, 1, 3], [0, 1, 3, 2], [3, 2, 1, 0], [2, 0, 3, 1]):
        check_forward("Transpose", [x], {"perm": perm})
    check_forward("Transpose", [rand((2, 37, 45), dtype)], {"perm": [0, 2, 1]})  # tiled


def test_transpose_shapes():
    check_forward("Transpose", [rand((7, 9))])                          # default: reverse
    check_forward("Transpose", [rand((2, 37, 3, 45))], {"perm": [0, 2, 1, 3]})  # attention
    check_forward("Transpose", [rand((3, 67, 33))], {"perm": [0, 2, 1]})  # tiled, ragged
    check_forward("Transpose", [rand((1, 5, 1, 7))], {"perm": [2, 3, 0, 1]})
    check_forward("Transpose", [rand((4, 1, 6))], {"perm": [1, 0, 2]})   # no-op move
    check_forward("Transpose", [rand((0, 3))], {"perm": [1, 0]})
    check_forward("Transpose", [rand(())])
    big = rand((2, 256, 4, 64))
    check_forward("Transpose", [big], {"perm": [0, 2, 1, 3]})
    check_forward("Transpose", [rand((8, 128, 96))], {"perm": [0, 2, 1]})


def test_transpose_backward():
    for shape, perm in [((2, 3, 4, 5), [0, 2, 1, 3]), ((3, 40, 36), [0, 2, 1]),
                        ((2, 3, 4), [2, 0, 1])]:
        check_backward("Transpose", [rand(shape)], lambda a, p=perm: a.permute(*p),
                       {"perm": perm})


def test_transpose_error():
    with pytest.raises(_core.PyedgeError, match="not a permutation"):
        run("Transpose", [rand((2, 3))], {"perm": [0, 0]})


# ---------------------------------------------------------------- concat / split

@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_split_all_dtypes(dtype):
    a, b = rand((2, 3, 4), dtype), rand((2, 5, 4), dtype, seed=1)
    check_forward("Concat", [a, b], {"axis": 1})
    check_forward("Concat", [a, a], {"axis": -1})
    check_forward("Split", [b, ints(2, 3)], {"axis": 1}, opset=13, n_outputs=2,
                  num_outputs=2)


def test_concat_variants():
    a, b, c = rand((2, 3)), rand((2, 0)), rand((2, 4))
    check_forward("Concat", [a, b, c], {"axis": 1})
    check_forward("Concat", [a, a, a], {"axis": 0})
    check_forward("Concat", [ints(1, 2), ints(3)], {"axis": 0})
    check_backward("Concat", [a, c, a], lambda x, y, z: torch.cat([x, y, z], 1), {"axis": 1})
    check_backward("Concat", [a, rand((5, 3))], lambda x, y: torch.cat([x, y], 0), {"axis": 0})
    with pytest.raises(_core.PyedgeError, match="does not match input 0"):
        run("Concat", [a, rand((3, 3))], {"axis": 1})


def test_split_opsets():
    x = rand((6, 10))
    check_forward("Split", [x], {"axis": 1, "split": [3, 7]}, opset=11, n_outputs=2,
                  num_outputs=2)
    check_forward("Split", [x], {"axis": 0}, opset=11, n_outputs=3, num_outputs=3)
    check_forward("Split", [x, ints(1, 0, 9)], {"axis": -1}, opset=13, n_outputs=3,
                  num_outputs=3)
    check_forward("Split", [x], {"axis": 1}, opset=13, n_outputs=2, num_outputs=2)
    check_forward("Split", [x], {"axis": 1, "num_outputs": 3}, opset=18, n_outputs=3,
                  num_outputs=3)  # 4, 4, 2
    check_forward("Split", [x], {"axis": 0, "num_outputs": 4}, opset=18, n_outputs=4,
                  num_outputs=4)  # 2, 2, 2, 0


def test_split_backward():
    x = rand((4, 9))
    check_backward("Split", [x, ints(2, 3, 4)],
                   lambda a, s: torch.split(a, [2, 3, 4], dim=1), {"axis": 1}, opset=13,
                   num_outputs=3)
    # an output without gradient counts as zero
    g = [rand((4, 2), seed=3), None, rand((4, 4), seed=4)]
    _, grads = _core.run_op("Split", [x, ints(2, 3, 4)], {"axis": 1}, opset=13,
                            grad_outputs=g, num_outputs=3)
    np.testing.assert_array_equal(grads[0], np.concatenate([g[0], np.zeros((4, 3)), g[2]], 1))


def test_split_errors():
    with pytest.raises(_core.PyedgeError, match="sum to"):
        run("Split", [rand((4, 9)), ints(2, 3)], {"axis": 1}, opset=13, num_outputs=2)
    with pytest.raises(_core.PyedgeError, match="evenly"):
        run("Split", [rand((4, 9))], {"axis": 1}, opset=13, num_outputs=2)


# ---------------------------------------------------------------- slice

@pytest.mark.parametrize("dtype", DTYPES)
def test_slice_all_dtypes(dtype):
    x = rand((5, 6, 7), dtype)
    check_forward("Slice", [x, ints(1, -1), ints(4, 0), ints(0, 2), ints(2, -2)])


SLICES = [
    # starts, ends, axes, steps
    ([0], [3], None, None),
    ([1, 2], [-1, 100], [0, 2], None),
    ([-1], [SMALL], [1], [-1]),                 # full reverse
    ([BIG], [SMALL], [2], [-2]),
    ([4, -3], [-100, 1], [-3, 1], [-2, 1]),
    ([0], [BIG], [2], [3]),
    ([3], [3], [0], [1]),                       # empty
    ([5], [100], [1], [1]),                     # empty after clamping
    ([-100], [100], [0], [1]),
    ([2, 1, 0], [4, 5, 7], None, [1, 2, 3]),
]


@pytest.mark.parametrize("case", range(len(SLICES)))
def test_slice_forward_backward(case):
    starts, ends, axes, steps = SLICES[case]
    x = rand((5, 6, 7))
    inputs = [x, ints(*starts), ints(*ends)]
    if axes is not None or steps is not None:
        inputs.append(ints(*(axes if axes is not None else range(len(starts)))))
    if steps is not None:
        inputs.append(ints(*steps))
    check_forward("Slice", inputs)
    # which elements onnxruntime picks: slice an array of flat positions
    pos = ort_run("Slice", [np.arange(x.size).reshape(x.shape)] + inputs[1:])[0]
    if pos.size:
        check_backward("Slice", inputs,
                       lambda a, *rest: a.reshape(-1)[torch.from_numpy(pos)])


def test_slice_opset9_attributes():
    x = rand((4, 5))
    check_forward("Slice", [x], {"starts": [1, -3], "ends": [3, BIG], "axes": [0, 1]}, opset=9)
    check_forward("Slice", [x], {"starts": [1], "ends": [3]}, opset=9)


def test_slice_errors():
    x = rand((4, 5))
    with pytest.raises(_core.PyedgeError, match="step 0"):
        run("Slice", [x, ints(0), ints(2), ints(0), ints(0)])
    with pytest.raises(_core.PyedgeError, match="axis 2 out of range"):
        run("Slice", [x, ints(0), ints(2), ints(2)])


# ---------------------------------------------------------------- tile / pad / trilu

@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_pad_all_dtypes(dtype):
    x = rand((2, 3, 4), dtype)
    check_forward("Tile", [x, ints(2, 1, 3)])
    if dtype == np.bool_:  # onnxruntime's Pad has no bool kernel: compare with numpy
        out = run("Pad", [x, ints(1, 0, 2, 0, 1, 1)])[0]
        np.testing.assert_array_equal(out, np.pad(x, [(1, 0), (0, 1), (2, 1)]))
    else:
        check_forward("Pad", [x, ints(1, 0, 2, 0, 1, 1), np.array(7, dtype)])


def test_tile():
    x = rand((3, 4))
    for reps in [(1, 1), (3, 1), (1, 3), (2, 5), (0, 2)]:
        check_forward("Tile", [x, ints(*reps)])
    check_forward("Tile", [rand((2, 1, 3)), ints(2, 4, 1)])
    check_backward("Tile", [x, ints(2, 3)], lambda a, r: a.tile(2, 3))
    check_backward("Tile", [rand((2, 1, 3)), ints(3, 4, 2)], lambda a, r: a.tile(3, 4, 2))


def test_pad():
    x = rand((3, 4, 5))
    check_forward("Pad", [x, ints(0, 1, 2, 0, 3, 1)])
    check_forward("Pad", [x, ints(1, 1, 1, 1, 1, 1), np.array(-2.5, np.float32)],
                  const_inputs=[2])
    check_forward("Pad", [x, ints(1, 1, 1, 1, 1, 1), np.array(-2.5, np.float32)])  # runtime
    check_forward("Pad", [x, ints(-1, 0, -2, 1, -1, 0)])                           # crop
    check_forward("Pad", [np.arange(6).reshape(2, 3), ints(1, 1, 1, 1), np.array(2**40 + 3)])
    check_forward("Pad", [x, ints(2, -3), None, ints(-1)], opset=18)
    check_forward("Pad", [x], {"pads": [0, 0, 1, 0, 0, 2], "value": 1.0}, opset=10)
    check_backward("Pad", [x, ints(0, 1, 2, 0, 3, 1)],
                   lambda a, p: torch.nn.functional.pad(a, (2, 1, 1, 3, 0, 0)))
    check_backward("Pad", [x, ints(-1, 0, -2, 1, 1, 0)],
                   lambda a, p: torch.nn.functional.pad(a, (-2, 0, 0, 1, -1, 1)))
    # edge / reflect / wrap: tests/test_ops_import_breadth.py
    with pytest.raises(_core.PyedgeError, match="mode 'mirror' is not supported"):
        run("Pad", [x, ints(0, 1, 2, 0, 3, 1)], {"mode": "mirror"})


@pytest.mark.parametrize("dtype", DTYPES)
def test_trilu_all_dtypes(dtype):
    x = rand((2, 4, 5), dtype)
    for upper in (0, 1):
        for k in (-1, 0, 2):
            out = run("Trilu", [x, ints(k)], {"upper": upper}, opset=14)[0]
            ref = np.triu(x, k) if upper else np.tril(x, k)
            np.testing.assert_array_equal(out, ref)


def test_trilu():
    x = rand((3, 6, 4))
    for upper in (0, 1):
        for k in (None, -2, 0, 1, 10, -10):
            inputs = [x] if k is None else [x, np.array(k, I64)]
            check_forward("Trilu", inputs, {"upper": upper}, opset=14)
    check_backward("Trilu", [x, np.array(1, I64)], lambda a, k: torch.triu(a, 1), opset=14)
    check_backward("Trilu", [x], lambda a: torch.tril(a), {"upper": 0}, opset=14)
