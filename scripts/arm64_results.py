"""Per-module results of `scripts/arm64-check.sh --full` (the whole suite under qemu, hours, over
more than one working session): record one module's outcome, and print the aggregate.

    python3 scripts/arm64_results.py record DIR MODULE RC SECONDS   # after each module's pytest
    python3 scripts/arm64_results.py summary DIR [--counts FILE]     # aggregate (--summary)

DIR is the results directory of one commit (.arm64/full/<commit>): `modules.txt` lists the
modules the run covers; each module leaves `<module>.xml` (pytest --junitxml), `<module>.log`
and, once finished, `<module>.json` (what `record` writes; `--resume` skips modules that have
one). A module whose pytest died without its XML (a crash, the per-module timeout) is recorded
as one error with the reason. `--counts` takes `pytest --collect-only -q` output (native, quick)
and estimates the time of the modules not done yet from the done ones' seconds per test.
Standard library only (runs on the host's python3).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET

TIMEOUT_RCS = (124, 137)  # timeout(1): TERM sent / KILL after the grace period


def module_id(classname: str, name: str) -> str:
    """junit classname 'tests.test_x.TestY' + name -> 'tests/test_x.py::TestY::name'."""
    parts = classname.split(".")
    for k in range(len(parts), 0, -1):
        if parts[k - 1].startswith("test_"):
            return "/".join(parts[:k]) + ".py" + "".join("::" + p for p in parts[k:]) + "::" + name
    return f"{classname}::{name}"


def parse_junit(path: str) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for s in suites:
        out["tests"] += int(s.get("tests", 0))
        out["failed"] += int(s.get("failures", 0))
        out["errors"] += int(s.get("errors", 0))
        out["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            for kind in ("failure", "error"):
                el = case.find(kind)
                if el is not None:
                    msg = (el.get("message") or el.text or "").strip()
                    msg = re.sub(r"(\x1b|#x1B)\[[0-9;]*m", "", msg).splitlines()  # colours
                    out["failures"].append(
                        f"{'FAILED' if kind == 'failure' else 'ERROR'} "
                        f"{module_id(case.get('classname', ''), case.get('name', ''))}"
                        + (f" - {msg[0][:200]}" if msg else ""))
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out


def record(d: str, module: str, rc: int, seconds: float) -> dict:
    xml = os.path.join(d, f"{module}.xml")
    ended = time.time()  # the module's interval: modules may run side by side (--jobs)
    res = {"module": module, "rc": rc, "seconds": round(seconds, 1),
           "started": round(ended - seconds, 1), "ended": round(ended, 1)}
    try:
        res.update(parse_junit(xml))
        res["status"] = "no tests" if rc == 5 else "done"
    except (OSError, ET.ParseError) as e:
        reason = (f"timed out (rc={rc})" if rc in TIMEOUT_RCS
                  else f"pytest died without its junit XML (rc={rc}: {type(e).__name__})")
        res.update(tests=0, passed=0, failed=0, skipped=0, errors=1, status=reason,
                   failures=[f"ERROR {module}: {reason}; see {module}.log"])
    with open(os.path.join(d, f"{module}.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def load(d: str) -> tuple[list[str], dict[str, dict]]:
    mods_file = os.path.join(d, "modules.txt")
    planned = open(mods_file).read().split() if os.path.exists(mods_file) else []
    done = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".json"):
            with open(os.path.join(d, fn)) as f:
                r = json.load(f)
            done[r["module"]] = r
    return planned or sorted(done), done


def read_counts(path: str) -> dict[str, int]:
    """`pytest --collect-only -q` lines 'tests/test_x.py::test_y[...]' -> tests per module."""
    counts: dict[str, int] = {}
    for line in open(path):
        m = re.match(r"(?:.*/)?(test_[A-Za-z0-9_]+)\.py::", line.strip())
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def wall_seconds(results) -> float:
    """Length of the union of the modules' [started, ended] intervals: the wall time the
    suite took, side-by-side modules counted once and the pauses between resumed runs not at
    all (results recorded before the intervals were kept count their own seconds)."""
    spans = sorted((r["started"], r["ended"]) for r in results if "started" in r)
    total = sum(r["seconds"] for r in results if "started" not in r)
    cur = None
    for a, b in spans:
        if cur and a <= cur[1]:
            cur[1] = max(cur[1], b)
            continue
        if cur:
            total += cur[1] - cur[0]
        cur = [a, b]
    return total + (cur[1] - cur[0] if cur else 0.0)


def hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary(d: str, counts_file: str | None = None, out=sys.stdout) -> dict:
    planned, done = load(d)
    tot = {k: sum(r.get(k, 0) for r in done.values())
           for k in ("tests", "passed", "failed", "skipped", "errors", "seconds")}
    wall = wall_seconds(done.values())
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"results: {d}")
    for m in planned:
        r = done.get(m)
        if r:
            p(f"  {m:42s} {hms(r['seconds']):>8s}  {r['passed']:4d} passed {r['failed']:3d} failed "
              f"{r['skipped']:4d} skipped {r['errors']:3d} errors"
              + ("" if r["status"] == "done" else f"  [{r['status']}]"))
    left = [m for m in planned if m not in done]
    p(f"aggregate: {len(done)} of {len(planned)} modules done: {tot['passed']} passed, "
      f"{tot['failed']} failed, {tot['skipped']} skipped, {tot['errors']} errors; "
      f"wall time {hms(wall)} ({wall:.0f} s; the modules' own times sum to "
      f"{hms(tot['seconds'])})")
    fails = [f for r in done.values() for f in r.get("failures", [])]
    for f in fails[:60]:
        p("  " + f)
    if len(fails) > 60:
        p(f"  ... {len(fails) - 60} more (see the modules' .json)")
    est = None
    if counts_file and left:
        counts = read_counts(counts_file)
        per_test = tot["seconds"] / max(1, tot["tests"])
        n_left = sum(counts.get(m, 0) for m in left)
        est = n_left * per_test
        p(f"estimate: {len(left)} modules left, {n_left} tests natively collected, at "
          f"{per_test:.2f} s per test (the done modules' mean): ~{hms(est)} more; whole suite "
          f"~{hms(est + tot['seconds'])}")
    elif left:
        p(f"not done: {len(left)} modules ({', '.join(left[:8])}{', ...' if len(left) > 8 else ''})")
    return dict(tot, wall=wall, modules_done=len(done), modules=len(planned), estimate_left=est)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("dir")
    r.add_argument("module")
    r.add_argument("rc", type=int)
    r.add_argument("seconds", type=float)
    s = sub.add_parser("summary")
    s.add_argument("dir")
    s.add_argument("--counts")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.dir):
        print(f"no results directory {a.dir}", file=sys.stderr)
        return 1
    if a.cmd == "record":
        res = record(a.dir, a.module, a.rc, a.seconds)
        print(f"{a.module}: {res['passed']} passed, {res['failed']} failed, {res['skipped']} "
              f"skipped, {res['errors']} errors in {res['seconds']:.0f}s ({res['status']})")
        return 0
    summary(a.dir, a.counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
