import numpy as np
import pytest
from optional_deps import optional
torch = optional("torch")

from opcheck import check_forward
from pyedge import _core

rng = np.random.default_rng(1)


@pytest.mark.parametrize("dshape,ishape,bd", [((4, 5, 3), (2, 2), 0), ((4, 5, 3), (6, 1), 0),
                                               ((2, 5, 3), (2, 4, 1), 1), ((3, 4), (2, 3, 2), 0)])
def test_gather_nd(dshape, ishape, bd):
    data = rng.standard_normal(dshape).astype(np.float32)
    k = ishape[-1]
    hi = dshape[bd:bd + k]
    idx = np.stack([rng.integers(-h, h, size=ishape[:-1]) for h in hi], -1).astype(np.int64)
    out = check_forward("GatherND", [data, idx], {"batch_dims": bd})[0]
    # gradient: scatter-add of the output gradient, checked against an explicit loop
    g = rng.standard_normal(out.shape).astype(np.float32)
    _, (dd, _) = _core.run_op("GatherND", [data, idx], {"batch_dims": bd}, grad_outputs=[g])
    ref = np.zeros_like(data)
    t = torch.zeros(dshape, dtype=torch.float64)
    flat_b = int(np.prod(dshape[:bd])) if bd else 1
    ref_b = ref.reshape((flat_b,) + dshape[bd:])
    idx_b = idx.reshape((flat_b, -1, k))
    g_b = g.reshape((flat_b, idx_b.shape[1]) + dshape[bd + k:])
    for b in range(flat_b):
        for q in range(idx_b.shape[1]):
            ref_b[b][tuple(idx_b[b, q])] += g_b[b, q]
    np.testing.assert_allclose(dd, ref, rtol=1e-5, atol=1e-5)


def test_gather_nd_out_of_range():
    with pytest.raises(_core.PyedgeError, match="out of range"):
        _core.run_op("GatherND", [np.ones((2, 2), np.float32), np.array([[5, 0]], np.int64)])
