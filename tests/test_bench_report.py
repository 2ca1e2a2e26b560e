"""The bench's aggregation: the SGEMM rate the W1 target uses and how steps are compared
with it (bench/report.py), on synthetic worker results (no engine runs here)."""
import statistics

import pytest

from bench import report

GFLOP = 1e9


def _sgemm(numpy, pyedge):
    return {"ok": True, "when": "x", "numpy": {"gflops": numpy}, "pyedge": {"gflops": pyedge},
            "pyedge_blas_core": "SkylakeX"}


def _run(engine, times, rss=100 * 2 ** 20):
    return {"ok": True, "workload": "1", "engine": engine, "times": times,
            "losses": [1.0, 0.9], "peak_rss": rss, "build_s": 1.0}


def _summarize(sgemm, pyedge_times):
    runs = [_run("pyedge", pyedge_times), _run("ort", [1.0, 1.0]), _run("torch", [2.0])]
    flops = {"1": {"total": 100 * GFLOP, "forward": 50 * GFLOP, "backward": 50 * GFLOP}}
    config = {"workloads": ["1"], "steps": {"1": 3}, "warmup": {"1": 1}, "repeats": 1,
              "threads": 2, "git": "t", "date": "d"}
    machine = {"cpu": "test", "logical_cpus": 2}
    return report.summarize(runs, sgemm, flops, {"1": ["pyedge", "torch", "ort"]}, machine,
                            [], config)


def test_rate_is_the_pooled_median_of_the_faster_library():
    # pyedge's calls pooled over both calibrations: 190 200 210 220 400 -> median 210;
    # numpy's median is lower (110) even though its single best call (300) is not
    sgemm = [_sgemm([100, 110, 300], [200, 210, 220]), _sgemm([105, 120], [190, 400])]
    res = _summarize(sgemm, [0.5, 0.4, 0.6])
    sg = res["sgemm"]
    assert sg["rate_gflops"] == pytest.approx(210.0)
    assert sg["rate_library"] == "pyedge"
    assert sg["best_call_gflops"] == pytest.approx(400.0)
    st = res["summary"]["1"]["pyedge"]
    # median step 0.5 s -> 200 GFLOP/s against 210; fastest step 0.4 s -> 250 against 400
    assert st["gflops"] == pytest.approx(200.0)
    assert st["sgemm_fraction"] == pytest.approx(200.0 / 210.0)
    assert st["sgemm_fraction_best"] == pytest.approx(250.0 / 400.0)
    t = next(t for t in res["targets"] if t["kind"] == "sgemm_fraction")
    assert t["value"] == pytest.approx(200.0 / 210.0) and t["held"] is True


def test_target_not_held_below_85_percent_and_table_names_both_rates():
    sgemm = [_sgemm([50], [300, 320, 310])]
    res = _summarize(sgemm, [0.45, 0.4])  # median 0.425 s -> 235 GFLOP/s = 76% of 310
    t = next(t for t in res["targets"] if t["kind"] == "sgemm_fraction")
    assert t["value"] == pytest.approx(100 / 0.425 / 310) and t["held"] is False
    md = report.markdown(res)
    assert "**310.0 GFLOP/s** = median over all calibration calls of pyedge's core GEMM" in md
    assert "Best single call 320.0 GFLOP/s" in md
    assert "76% (fastest step vs best call: 78%)" in md
    assert "| W1 | >= 85% of measured SGEMM rate |" in md and "not held" in md


def test_numpy_wins_when_its_median_is_higher():
    sgemm = [_sgemm([400, 410, 420], [300, 500, 305])]
    res = _summarize(sgemm, [0.5])
    assert res["sgemm"]["rate_library"] == "numpy"
    assert res["sgemm"]["rate_gflops"] == pytest.approx(statistics.median([400, 410, 420]))
    assert res["sgemm"]["best_call_gflops"] == pytest.approx(500.0)
