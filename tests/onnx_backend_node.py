"""ONNX's own backend node tests, run through pyedge for the ops the README claims.

The installed onnx package regenerates its node test cases (model + inputs + expected
outputs) in memory (`onnx.backend.test.case.node.collect_testcases`); each case whose graph
uses only ops from README's "Supported ops" is run through `TrainingSession(loss=None).run`
and its outputs compared with the expected ones (onnx's backend tolerances: rtol 1e-3,
atol 1e-7; 1e-5 absolute here for float32 kernels with a different summation order).

Each case ends as one of:
  pass    the outputs match;
  scope   pyedge refused it with a clean error (out of scope: the reason is the error's
          category, see `reason`);
  wrong   it ran and gave wrong values, or raised something other than a documented error
          (a bug: the count of these must stay 0).

    python tests/onnx_backend_node.py            # the table per op, then the totals
"""
from __future__ import annotations

import collections
import re
import warnings
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def claimed_ops() -> set[str]:
    """The op names listed in README's "Supported ops" section (first paragraph)."""
    import onnx
    text = README.read_text()
    sec = text.split("## Supported ops", 1)[1].split("\n\n", 2)[1]
    known = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    return {w for w in re.findall(r"[A-Z][A-Za-z0-9]+", sec) if w in known}


_CASES = None


def node_cases():
    """onnx's node test cases (computed once per process: ~6 s of CPU)."""
    global _CASES
    if _CASES is None:
        from onnx.backend.test.case import node
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            _CASES = list(node.collect_testcases(None))
    return _CASES


# Error text -> why a case is out of scope (first match wins).
_REASONS = [
    (r"must be a constant|must be known when the plan is built", "parameter given as a graph input"),
    (r"sequence/optional", "sequence or optional type"),
    (r"SplitToSequence|SequenceAt", "sequence output (SplitToSequence is rewritten only when "
     "constant SequenceAt positions read it)"),
    (r"fmod=1", "floating-point Mod with fmod=0 (Python's sign rule)"),
    (r"unsupported element type|unsupported dtype|uint8|got bool|float16|bfloat16",
     "element type the core lacks for this op (uint16/32/64, float16, bfloat16, 2/4/8-bit "
     "floats and ints as values; uint8 arithmetic; bool reductions)"),
    (r"storage_order", "MaxPool storage_order=1 (column-major Indices)"),
    (r"random", "random output (training-mode Dropout): no implementation can match it"),
]


def reason(msg: str) -> str:
    for pat, why in _REASONS:
        if re.search(pat, msg):
            return why
    return "other clean error"


def _array(x):
    """numpy value of a data-set entry (a TensorProto for types numpy lacks: kept as is)."""
    import onnx
    if isinstance(x, onnx.TensorProto):
        try:
            return onnx.numpy_helper.to_array(x)
        except Exception:  # noqa: BLE001 - a type numpy cannot hold
            return x
    return x


def run_case(case) -> tuple[str, str]:
    """(outcome, detail) for one test case over all its data sets."""
    import pyedge
    from pyedge.onnx_import import ModelLoadError
    clean = (pyedge.PyedgeError, ModelLoadError, ValueError, NotImplementedError)
    model = case.model
    in_names = [i.name for i in model.graph.input
                if i.name not in {t.name for t in model.graph.initializer}]
    out_names = [o.name for o in model.graph.output]
    if case.name.startswith("test_training_dropout") and "zero_ratio" not in case.name:
        return "scope", "random output (training-mode Dropout)"
    try:
        sess = pyedge.TrainingSession(model, loss=None, fuse=False)
    except clean as e:
        return "scope", str(e).splitlines()[0] if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 - anything else is a bug to report
        return "wrong", f"{type(e).__name__} at load: {e}"
    for inputs, expected in case.data_sets:
        inputs, expected = [_array(x) for x in inputs], [_array(x) for x in expected]
        if any(not isinstance(x, (np.ndarray, np.generic)) for x in inputs):
            return "scope", "sequence/optional inputs: element type the core lacks"
        feed = dict(zip(in_names, (np.asarray(x) for x in inputs)))
        try:
            got = sess.run(feed, out_names)
        except clean as e:
            return "scope", str(e).splitlines()[0] if str(e) else type(e).__name__
        except Exception as e:  # noqa: BLE001
            return "wrong", f"{type(e).__name__} at run: {e}"
        for name, want in zip(out_names, expected):
            have = got[name]
            want = np.asarray(want)
            if have.shape != want.shape:
                return "wrong", f"output {name}: shape {have.shape}, expected {want.shape}"
            if have.dtype != want.dtype:
                # the core has no 8/16-bit or unsigned wide types: a widened result is
                # not the op's contract
                return "scope", f"output {name} is {have.dtype}, expected {want.dtype}: " \
                                "element type the core lacks"
            if want.dtype.kind in "fc":
                ok = np.allclose(have, want, rtol=1e-3, atol=1e-5, equal_nan=True)
            else:
                ok = np.array_equal(have, want)
            if not ok:
                err = np.nanmax(np.abs(have.astype(np.float64) - want.astype(np.float64)))
                return "wrong", f"output {name}: max abs error {err:.3g}"
    return "pass", ""


def op_of(case) -> str:
    return case.model.graph.node[0].op_type if case.model.graph.node else "?"


def selected_cases(ops: set[str] | None = None):
    """The cases of claimed ops: single-op graphs (not the '_expanded' function bodies,
    whose ops are counted under their own tests)."""
    ops = ops or claimed_ops()
    out = []
    for c in node_cases():
        nodes = c.model.graph.node
        if c.name.endswith("_expanded") or "_expanded_" in c.name:
            continue
        if len({n.op_type for n in nodes}) != 1 or nodes[0].domain not in ("", "ai.onnx"):
            continue
        if nodes[0].op_type in ops:
            out.append(c)
    return out


def run_all(ops: set[str] | None = None):
    """{op: Counter(outcome)}, [(case name, outcome, detail)]."""
    per_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    rows = []
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for c in selected_cases(ops):
            outcome, detail = run_case(c)
            per_op[op_of(c)][outcome] += 1
            rows.append((c.name, outcome, detail))
    return per_op, rows


def main() -> None:
    import sys
    per_op, rows = run_all()
    verbose = "-v" in sys.argv
    for name, outcome, detail in rows:
        if outcome != "pass" and (verbose or outcome == "wrong"):
            print(f"{outcome:6s} {name}: {detail[:160]}")
    print(f"{'op':24s} pass scope wrong")
    for op in sorted(per_op):
        c = per_op[op]
        print(f"{op:24s} {c['pass']:4d} {c['scope']:5d} {c['wrong']:5d}")
    tot = collections.Counter()
    for c in per_op.values():
        tot.update(c)
    print(f"total: {sum(tot.values())} cases, {tot['pass']} pass, {tot['scope']} out of scope, "
          f"{tot['wrong']} wrong")
    reasons = collections.Counter(reason(d) for _, o, d in rows if o == "scope")
    for why, k in reasons.most_common():
        print(f"  out of scope, {why}: {k}")


if __name__ == "__main__":
    main()
