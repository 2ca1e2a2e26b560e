"""The op families test_ops_fd.py does not cover, forward against float64 numpy and backward
against central finite differences: pooling, batch norm, reductions, indexing, layout and
shape ops, the remaining elementwise math and activations. numpy only, so the `arm64` subset
(scripts/arm64-check.sh, the wheels' device tests) checks every differentiable op family on
ARM too. Helpers (R, _fd_grads) and the check itself are test_ops_fd.py's."""
import numpy as np
import pytest

from test_ops_fd import R, test_backward_vs_finite_differences as _check

pytestmark = pytest.mark.arm64


def _maxpool(x, k=2, s=2):
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.full((n, c, oh, ow), -np.inf)
    for i in range(k):
        for j in range(k):
            y = np.maximum(y, x[:, :, i:i + s * oh:s, j:j + s * ow:s])
    return y


def _avgpool(x, k=2, s=1):
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    y = np.zeros((n, c, oh, ow))
    for i in range(k):
        for j in range(k):
            y += x[:, :, i:i + s * oh:s, j:j + s * ow:s]
    return y / (k * k)


def _batchnorm_eval(x, g, b, m, v, eps=1e-5):
    sh = (1, -1, 1, 1)
    return (x - m.reshape(sh)) / np.sqrt(v.reshape(sh) + eps) * g.reshape(sh) + b.reshape(sh)


def _distinct(*shape, seed=0):
    """Values far apart (no ties for Max/MaxPool/ReduceMax under +-eps)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (rng.permutation(n).reshape(shape) * 0.1 - 0.05 * n).astype(np.float32)


IDX = np.array([[0, 2], [1, 0]], np.int64)
CASES = [
    # pooling, batch norm (inference form: running statistics given)
    ("maxpool", "MaxPool", [_distinct(1, 2, 4, 6)], {"kernel_shape": [2, 2], "strides": [2, 2]},
     17, _maxpool),
    ("averagepool", "AveragePool", [R(1, 2, 4, 5)], {"kernel_shape": [2, 2]}, 17, _avgpool),
    ("globalaveragepool", "GlobalAveragePool", [R(2, 3, 3, 4)], {}, 17,
     lambda x: x.mean((2, 3), keepdims=True)),
    ("batchnorm", "BatchNormalization",
     [R(2, 3, 2, 2), R(3, seed=1, shift=1), R(3, seed=2), R(3, seed=3),
      np.abs(R(3, seed=4)) + 0.5], {}, 15, _batchnorm_eval),
    # reductions
    ("reducesum", "ReduceSum", [R(3, 4, 5), np.array([0, 2], np.int64)], {"keepdims": 0}, 17,
     lambda x, a: x.sum((0, 2))),
    ("reducemax", "ReduceMax", [_distinct(3, 4)], {"axes": [1], "keepdims": 1}, 17,
     lambda x: x.max(1, keepdims=True)),
    ("reducesumsquare", "ReduceSumSquare", [R(3, 4)], {"axes": [0], "keepdims": 0}, 17,
     lambda x: (x * x).sum(0)),
    ("cumsum", "CumSum", [R(3, 5), np.array(1, np.int64)], {}, 17,
     lambda x, a: np.cumsum(x, 1)),
    # indexing
    ("gather", "Gather", [R(5, 3), IDX], {"axis": 0}, 17, lambda x, i: x[IDX]),
    ("gatherelements", "GatherElements", [R(3, 4), np.array([[0, 3], [2, 2], [1, 0]], np.int64)],
     {"axis": 1}, 17, lambda x, i: np.take_along_axis(x, np.array([[0, 3], [2, 2], [1, 0]]), 1)),
    ("slice", "Slice", [R(4, 6), np.array([1, 0], np.int64), np.array([4, 6], np.int64),
                        np.array([0, 1], np.int64), np.array([2, 2], np.int64)], {}, 17,
     lambda x, *a: x[1:4:2, 0:6:2]),
    ("where", "Where", [np.array([[True, False, True]]), R(2, 3), R(2, 3, seed=1)], {}, 17,
     lambda c, a, b: np.where(np.array([[True, False, True]]), a, b)),
    # layout and shape
    ("concat", "Concat", [R(2, 3), R(2, 2, seed=1)], {"axis": 1}, 17,
     lambda a, b: np.concatenate([a, b], 1)),
    ("pad", "Pad", [R(2, 3), np.array([1, 0, 0, 2], np.int64)], {}, 17,
     lambda x, p: np.pad(x, ((1, 0), (0, 2)))),
    ("tile", "Tile", [R(2, 3), np.array([2, 1], np.int64)], {}, 17,
     lambda x, r: np.tile(x, (2, 1))),
    ("expand", "Expand", [R(3, 1), np.array([2, 3, 4], np.int64)], {}, 17,
     lambda x, s: np.broadcast_to(x, (2, 3, 4))),
    ("reshape", "Reshape", [R(2, 6), np.array([3, -1], np.int64)], {}, 17,
     lambda x, s: x.reshape(3, 4)),
    ("trilu", "Trilu", [R(4, 4)], {"upper": 0}, 17, np.tril),
    # elementwise math and activations not in test_ops_fd.py / test_simd_unary.py
    ("pow", "Pow", [np.abs(R(3, 4)) + 0.5, R(3, 4, seed=1)], {}, 17, np.power),
    ("sub_broadcast", "Sub", [R(3, 4), R(1, 4, seed=1)], {}, 17, np.subtract),
    ("max", "Max", [_distinct(3, 4), _distinct(3, 4, seed=1)], {}, 17, np.maximum),
    ("mean", "Mean", [R(3, 4), R(3, 4, seed=1), R(4, seed=2)], {}, 17,
     lambda a, b, c: (a + b + c) / 3),
    ("sqrt", "Sqrt", [np.abs(R(3, 4)) + 0.2], {}, 17, np.sqrt),
    ("reciprocal", "Reciprocal", [np.abs(R(3, 4)) + 0.5], {}, 17, lambda x: 1 / x),
    ("sin", "Sin", [R(3, 4)], {}, 17, np.sin),
    ("cos", "Cos", [R(3, 4)], {}, 17, np.cos),
    ("abs", "Abs", [_distinct(3, 4) + 0.01], {}, 17, np.abs),
    ("neg", "Neg", [R(3, 4)], {}, 17, np.negative),
    ("clip", "Clip", [_distinct(3, 4) + 0.033, np.array(-0.3, np.float32), np.array(0.4, np.float32)],
     {}, 17, lambda x, lo, hi: np.clip(x, -0.3, 0.4)),
    ("relu", "Relu", [_distinct(3, 4) + 0.01], {}, 17, lambda x: np.maximum(x, 0)),
    ("leakyrelu", "LeakyRelu", [_distinct(3, 4) + 0.01], {"alpha": 0.1}, 17,
     lambda x: np.where(x > 0, x, 0.1 * x)),
    ("hardsigmoid", "HardSigmoid", [R(3, 4, scale=2)], {}, 17,
     lambda x: np.clip(0.2 * x + 0.5, 0, 1)),
    ("hardswish", "HardSwish", [R(3, 4, scale=2)], {}, 17,
     lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
    ("softsign", "Softsign", [R(3, 4)], {}, 17, lambda x: x / (1 + np.abs(x))),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_family_backward_vs_finite_differences(case):
    _check(case)
