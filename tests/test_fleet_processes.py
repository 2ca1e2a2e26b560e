"""A real federation on loopback: `flower-superlink` and `flower-supernode` processes (Flower's
own commands, through pyedge/fleet/deploy.py), TLS on, SuperNode authentication on (keys
registered with `flwr supernode register`), the app started with `flwr run`.

- 3 nodes, each a non-IID shard of the demo task (2 of the 4 classes): the global adapters beat
  every node trained alone for the same steps on the union test set; one node is SIGKILLed in
  the middle of round 2 and the federation still completes; a node whose key was never
  registered is refused; the SuperNode side has no torch loaded; peak RSS reported.
- 1 node + FedAvg: the federation's adapters equal a plain pyedge run of the same steps.

Figures are printed (pytest -s) and written to <tmp>/fleet_figures.json.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr", reason="needs flwr (pip install pyedge[fleet])")
pytest.importorskip("cryptography", reason="needs cryptography (comes with flwr)")

from pyedge.fleet.deploy import LocalFleet, peak_rss_mib  # noqa: E402
from pyedge.fleet.local import (LocalTrainer, demo_shard, evaluate_arrays, load_npz,  # noqa: E402
                                make_session, plain_run)
from pyedge.fleet.settings import RunSettings  # noqa: E402
from pyedge.fleet.store import RoundStore  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The wall-clock limits below are for native speed. Under emulation (scripts/arm64-check.sh
# sets PYEDGE_EMULATION) every Flower process runs 10-30x slower: the waits, the rounds'
# timeouts and the reply delays stretch with it, so the test checks the same sequence.
TIME_SCALE = 10.0 if os.environ.get("PYEDGE_EMULATION") else 1.0


def fleet_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYEDGE_NUM_THREADS"] = "1"
    return env


def wait_for(cond, timeout, what, fleet=None):
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    logs = "" if fleet is None else "\n".join(f"--- {n}\n{fleet.log(n)[-2000:]}"
                                               for n in ["superlink", *fleet.nodes])
    raise TimeoutError(f"{what} not within {timeout:.0f} s\n{logs}")


def write_shards(folder: Path, n_nodes: int):
    paths, tests = [], []
    for i in range(n_nodes):
        x, y = demo_shard(i, n_nodes, n=400, seed=0)
        p = folder / f"node{i}.npz"
        np.savez(p, x=x, labels=y)
        paths.append(str(p))
        tests.append(demo_shard(i, n_nodes, n=400, seed=1))
    # the union test set: every node's test shard (all 4 classes)
    union = folder / "union_test.npz"
    np.savez(union, x=np.concatenate([t[0] for t in tests]),
             labels=np.concatenate([t[1] for t in tests]))
    return paths, str(union)


def accuracy(run, arrays, test_path):
    sess = make_session(run)
    for k, v in arrays.items():
        sess.trainable_parameters()[k][...] = v
    x, y = load_npz(test_path)
    return evaluate_arrays(sess, x, y)["accuracy"]


def train_messages(log: str) -> int:
    return log.count("Receiving: train message")


def test_three_nodes_tls_auth_non_iid_kill_and_unknown_key(tmp_path):
    paths, union = write_shards(tmp_path, 3)
    out = tmp_path / "out"
    rc = {"num-rounds": 3, "local-steps": 15, "batch-size": 16, "client-eval": False,
          "eval-data": union, "min-available-nodes": 2, "min-train-nodes": 2,
          "round-timeout": 40.0 * TIME_SCALE, "out-dir": str(out)}
    run = RunSettings.from_config(rc)
    figures = {}
    with LocalFleet(tmp_path / "fleet", env=fleet_env()) as fleet:
        fleet.start_superlink()
        for i, p in enumerate(paths):
            cfg = {"data-path": p}
            if i == 2:
                cfg["reply-delay"] = 4.0 * TIME_SCALE   # the node we kill: still training when it dies
            fleet.start_supernode(f"node{i}", cfg, fleet.node_key(f"node{i}"))
        # a board whose key nobody registered
        stranger = fleet.start_supernode("stranger", {"data-path": paths[0]},
                                         fleet.node_key("stranger", register=False),
                                         extra=["--max-retries", "2", "--max-wait-time", "20"])
        wait_for(lambda: fleet.online_nodes() == 3, 90, "3 SuperNodes online", fleet)
        wait_for(lambda: stranger.poll() is not None, 60, "the unregistered node to give up", fleet)
        assert stranger.returncode != 0
        assert "Failed to activate SuperNode" in fleet.log("stranger")

        t0 = time.monotonic()
        fleet.run(rc)
        store = RoundStore(out)
        wait_for(lambda: store.latest() is not None, 120, "round 1", fleet)
        victim = fleet.nodes["node2"]
        # round 2's train message reached the victim: it is training (or in its reply delay)
        wait_for(lambda: train_messages(fleet.log("node2")) >= 2, 60, "round 2 at node2", fleet)
        fleet.kill(victim)
        assert store.latest()[0] == 1   # round 2 is still open
        wait_for(lambda: len(store.metrics()) >= 3, 180, "rounds 2 and 3", fleet)
        figures["federation_seconds"] = time.monotonic() - t0
        survivors = [fleet.nodes["node0"], fleet.nodes["node1"]]
        figures["supernode_vmhwm_mib"] = [peak_rss_mib(p.pid) for p in survivors]
        maps = [Path(f"/proc/{p.pid}/maps").read_text() for p in survivors]
        assert not any("torch" in m for m in maps), "a SuperNode mapped torch"
        assert all(p.poll() is None for p in survivors)

    log = store.metrics()
    assert [m["round"] for m in log] == [1, 2, 3]
    assert log[0]["replies"] == 3
    assert log[1]["replies"] == 2 and len(log[1]["dropped"]) == 1
    assert log[2]["nodes"] == 2 and log[2]["replies"] == 2
    assert all(m["client-torch-imported"] == 0 for m in log)   # sys.modules of the ClientApp
    figures["clientapp_vmhwm_mib"] = max(m["client-vmhwm-mib"] for m in log)
    figures["factor_error_round1"] = log[0]["factor-error"]

    # the global adapters vs each node alone, same number of local steps, union test set
    final = store.latest()[1]
    glob = accuracy(run, final, union)
    alone = [accuracy(run, plain_run(run, p, run.num_rounds * run.local_steps), union)
             for p in paths]
    x, y = load_npz(union)
    figures.update(global_accuracy=glob, alone_accuracy=alone,
                   logged_global_accuracy=[m["global-accuracy"] for m in log],
                   base_accuracy=evaluate_arrays(LocalTrainer(run, paths[0]).session, x, y)["accuracy"])
    assert abs(log[-1]["global-accuracy"] - glob) < 1e-9
    assert glob > max(alone), figures
    assert (store.round_dir(3) / "adapter_model.safetensors").is_file()
    assert (store.round_dir(3) / "adapter_config.json").is_file()

    # peak RSS of pyedge alone and of Flower's ClientApp machinery alone, for comparison
    figures["pyedge_only_vmhwm_mib"] = _vmhwm_of(
        "from pyedge.fleet.local import LocalTrainer; from pyedge.fleet.settings import RunSettings;"
        f"t = LocalTrainer(RunSettings(local_steps=15, batch_size=16), {paths[0]!r}); t.train(15)")
    # what the flwr-clientapp process loads before it runs our app
    figures["flwr_clientapp_only_vmhwm_mib"] = _vmhwm_of(
        "from flwr.supernode.cli import flwr_clientapp")
    figures["python_numpy_vmhwm_mib"] = _vmhwm_of("import numpy")
    print("\nfleet figures:", json.dumps(figures, indent=1))
    (tmp_path / "fleet_figures.json").write_text(json.dumps(figures, indent=1))


def _vmhwm_of(code: str) -> float:
    probe = (code + "\nfor l in open('/proc/self/status'):\n"
             "    l.startswith('VmHWM') and print(int(l.split()[1]) / 1024)")
    r = subprocess.run([sys.executable, "-c", probe], env=fleet_env(), capture_output=True,
                       text=True, timeout=120 * TIME_SCALE, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def test_one_node_fedavg_equals_plain_run_over_tls(tmp_path):
    paths, _ = write_shards(tmp_path, 1)
    out = tmp_path / "out"
    rc = {"num-rounds": 2, "local-steps": 10, "batch-size": 16, "client-eval": False,
          "min-available-nodes": 1, "round-timeout": 60.0 * TIME_SCALE, "out-dir": str(out)}
    run = RunSettings.from_config(rc)
    with LocalFleet(tmp_path / "fleet", env=fleet_env()) as fleet:
        fleet.start_superlink()
        fleet.start_supernode("node0", {"data-path": paths[0]}, fleet.node_key("node0"))
        wait_for(lambda: fleet.online_nodes() == 1, 90, "the SuperNode online", fleet)
        fleet.run(rc)
        store = RoundStore(out)
        wait_for(lambda: len(store.metrics()) >= 2, 120, "2 rounds", fleet)
    fed = store.latest()[1]
    plain = plain_run(run, paths[0], 2 * 10)
    worst = max(float(np.abs(fed[k] - plain[k]).max()) for k in plain)
    print(f"\none node + FedAvg vs plain pyedge run: max |diff| = {worst:.3g}")
    assert worst <= 1e-6


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_simulation_with_flwr_run(tmp_path):
    """Flower's simulation runtime: `flwr run <app> local` (a SuperLink in simulation mode that
    flwr starts itself), 3 virtual nodes with demo shards by partition-id."""
    pytest.importorskip("ray", reason="Flower's simulation runtime needs ray (flwr[simulation])")
    import signal

    from pyedge.fleet import APP_DIR
    from pyedge.fleet.deploy import descendants
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    env = fleet_env()
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    args = [str(Path(sys.executable).parent / "flwr"), "run", str(APP_DIR), "local",
            "--run-config", f'num-rounds=2 local-steps=10 client-eval=false out-dir="{out}"',
            "--federation-config", "num-supernodes=3", "--stream"]
    try:
        r = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=400 * TIME_SCALE)
    finally:
        # the SuperLink flwr started for the simulation runs detached: stop it (and its children)
        for pid in _processes_mentioning(str(home)):
            for p in [*descendants(pid), pid]:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
    log = RoundStore(out).metrics()
    assert [m["replies"] for m in log] == [3, 3], r.stdout[-3000:] + r.stderr[-3000:]
    assert log[1]["train-loss"] < log[0]["train-loss"]


def test_server_restart_resumes_after_the_last_written_round(tmp_path):
    """The SuperLink (with its ServerApp) is SIGKILLed after round 1; restarted on the same
    state file, the SuperNodes reconnect by themselves and `flwr run` again continues at
    round 2."""
    paths, _ = write_shards(tmp_path, 2)
    out = tmp_path / "out"
    # No node may be dropped here (min-available-nodes 2: a dropped node stalls round 3), so
    # the round timeout is generous: after the restart each node first starts a ClientApp
    # process for the killed run's stale message, then one for the new run's; on a loaded
    # 2-core machine each start took ~45 s, and a 60 s timeout dropped the slower node.
    rc = {"num-rounds": 3, "local-steps": 10, "batch-size": 16, "client-eval": False,
          "min-available-nodes": 2, "round-timeout": 180.0 * TIME_SCALE, "out-dir": str(out)}
    with LocalFleet(tmp_path / "fleet", env=fleet_env()) as fleet:
        fleet.start_superlink()
        for i, p in enumerate(paths):
            cfg = {"data-path": p, **({"reply-delay": 3.0 * TIME_SCALE} if i == 0 else {})}
            fleet.start_supernode(f"node{i}", cfg, fleet.node_key(f"node{i}"))
        wait_for(lambda: fleet.online_nodes() == 2, 90, "2 SuperNodes online", fleet)
        fleet.run(rc)
        store = RoundStore(out)
        wait_for(lambda: store.latest() is not None, 120, "round 1", fleet)
        fleet.restart_superlink()
        assert store.latest()[0] == 1
        r1 = store.latest()[1]
        wait_for(lambda: fleet.online_nodes() == 2, 120, "the nodes back after the restart", fleet)
        fleet.run(rc)
        wait_for(lambda: store.latest()[0] == 3, 600, "rounds 2 and 3", fleet)
    log = store.metrics()
    assert [m["round"] for m in log] == [1, 2, 3]
    assert [m["replies"] for m in log] == [2, 2, 2], [m["dropped"] for m in log]
    assert [m["resumed-from"] for m in log] == [0, 1, 1]   # the 2nd run started after round 1
    assert all(np.array_equal(np.load(store.round_dir(1) / "global.npz")[k], v)
               for k, v in r1.items())
