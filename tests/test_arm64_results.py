"""scripts/arm64_results.py: per-module results of `arm64-check.sh --full` (recorded from
pytest's junit XML, a crash or a timeout without one) and the aggregate `--summary` prints."""
import importlib.util
import io
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "arm64_results", os.path.join(HERE, "..", "scripts", "arm64_results.py"))
ar = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ar)

SAMPLE = '''
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_ok():
    pass

def test_bad():
    assert 1 == 2, "one is not two"

def test_skip():
    pytest.skip("needs torch (not installed)")

def test_err(broken):
    pass

class TestK:
    def test_in_class(self):
        pass
'''


def test_record_and_summary_from_real_junit(tmp_path):
    src = tmp_path / "tests"
    src.mkdir()
    (src / "test_sample.py").write_text(SAMPLE)
    res = tmp_path / "res"
    res.mkdir()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        f"--junitxml={res / 'test_sample.xml'}", "tests/test_sample.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    (res / "modules.txt").write_text("test_sample\ntest_crash\ntest_slow\ntest_later\n")
    got = ar.record(str(res), "test_sample", r.returncode, 12.0)
    assert (got["tests"], got["passed"], got["failed"], got["skipped"], got["errors"]) == (5, 2, 1, 1, 1)
    assert any(f.startswith("FAILED tests/test_sample.py::test_bad - ") and "one is not two" in f
               for f in got["failures"]), got["failures"]
    assert any(f.startswith("ERROR tests/test_sample.py::test_err") for f in got["failures"])
    assert ar.module_id("tests.test_sample.TestK", "test_in_class") == \
        "tests/test_sample.py::TestK::test_in_class"

    crash = ar.record(str(res), "test_crash", -11, 30)   # no XML: died
    assert crash["errors"] == 1 and "died without its junit XML" in crash["status"]
    slow = ar.record(str(res), "test_slow", 124, 7200)  # no XML: timeout(1)
    assert slow["status"].startswith("timed out")

    counts = tmp_path / "collected.txt"
    counts.write_text("tests/test_sample.py::test_ok\n" + "tests/test_later.py::test_a[1]\n" * 4
                      + "\n123 tests collected in 2.0s\n")
    out = io.StringIO()
    tot = ar.summary(str(res), str(counts), out=out)
    text = out.getvalue()
    assert "aggregate: 3 of 4 modules done: 2 passed, 1 failed, 1 skipped, 3 errors" in text, text
    # the three were recorded just now: their intervals overlap, the wall time is the longest
    assert "wall time 2h00m (7200 s; the modules' own times sum to 2h00m)" in text, text
    assert (tot["modules_done"], tot["modules"]) == (3, 4)
    # the done modules ran 5 tests in 7242 s: the 4 tests left take 4x that per test
    assert abs(tot["estimate_left"] - 4 * 7242.0 / 5) < 1e-6
    assert "estimate: 1 modules left, 4 tests natively collected" in text


def test_summary_cli_without_results(tmp_path):
    assert ar.main(["summary", str(tmp_path / "none")]) == 1


def test_wall_time_counts_side_by_side_modules_once_and_no_pauses():
    runs = [{"started": 0, "ended": 100, "seconds": 100},     # jobs=2: two modules at once
            {"started": 50, "ended": 120, "seconds": 70},
            {"started": 120, "ended": 130, "seconds": 10},    # touching: one stretch
            {"started": 5000, "ended": 5060, "seconds": 60},  # resumed in another session
            {"seconds": 40}]                                  # recorded without an interval
    assert ar.wall_seconds(runs) == 130 + 60 + 40
    assert ar.wall_seconds([]) == 0
