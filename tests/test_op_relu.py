import numpy as np
import pytest
import torch

from opcheck import check_backward, check_forward
from pyedge import _core


def test_relu_forward_backward():
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    check_forward("Relu", [x])
    check_backward("Relu", [x], torch.relu)


def test_unknown_op_is_a_clear_error():
    with pytest.raises(_core.UnsupportedOpError, match="NoSuchOp"):
        _core.run_op("NoSuchOp", [np.ones(2, np.float32)])
