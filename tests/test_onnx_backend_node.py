"""ONNX's backend node tests for the ops README claims (tests/onnx_backend_node.py): the pass
count must not fall below the one measured (and written in README, "ONNX backend node
tests"), and no case may give wrong values or an undocumented exception: what pyedge cannot
run must be a clean error."""
import collections

import pytest

import onnx_backend_node as backend

pytest.importorskip("onnx.backend.test.case.node")

# Measured 2026-12-06 with onnx 1.23.2 (749 cases of claimed ops). Raise it when more pass.
MIN_PASS = 570


@pytest.fixture(scope="module")
def results():
    return backend.run_all()


def test_backend_node_pass_count(results):
    per_op, rows = results
    tot = collections.Counter()
    for c in per_op.values():
        tot.update(c)
    assert tot["pass"] >= MIN_PASS, (tot, [r for r in rows if r[1] != "pass"][:20])


def test_backend_node_nothing_wrong(results):
    _, rows = results
    wrong = [r for r in rows if r[1] == "wrong"]
    assert not wrong, wrong


def test_backend_node_out_of_scope_reasons_are_known(results):
    """Every refusal falls under one of the reasons README lists."""
    _, rows = results
    unknown = [r for r in rows if r[1] == "scope" and backend.reason(r[2]) == "other clean error"]
    assert not unknown, unknown


def test_claimed_ops_are_covered():
    """The README list parses, and the ops this issue added are among the tested ones."""
    ops = backend.claimed_ops()
    assert {"InstanceNormalization", "Pad", "AveragePool", "MaxPool", "Clip"} <= ops
    tested = {backend.op_of(c) for c in backend.selected_cases(ops)}
    assert {"InstanceNormalization", "Pad", "AveragePool"} <= tested
