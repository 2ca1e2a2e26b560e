"""The ClientApp and ServerApp of pyedge/fleet in one process, messages passed by a stand-in
Grid (no SuperLink): one node + FedAvg equals a plain pyedge run; a restarted server resumes
after its last written round; a node that never replies is dropped and the run completes; the
written adapters are PEFT files. Real processes, TLS and keys: test_fleet_processes.py."""
import json

import sys

import numpy as np
import pytest

pytest.importorskip("flwr", reason="needs flwr (pip install pyedge[fleet])")

from flwr.app import Context, RecordDict  # noqa: E402

from pyedge.fleet import client_app  # noqa: E402
from pyedge.fleet.local import LocalTrainer, demo_shard, plain_run  # noqa: E402
from pyedge.fleet.server_app import run_federation  # noqa: E402
from pyedge.fleet.settings import RunSettings  # noqa: E402
from pyedge.fleet.store import RoundStore  # noqa: E402


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages read the run/node ids of the process they are made in (set by flwr-serverapp /
    flwr-clientapp); here one process plays both."""
    from flwr.supercore.task_identity import TaskIdentity
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class LoopbackGrid:
    """Grid stand-in: delivers each message to client_app.app with the node's Context (kept
    per node for the run, as a SuperNode does); nodes in `silent` never reply."""

    def __init__(self, node_configs: dict, run_config: dict, silent=(), run_id=1):
        self.configs = node_configs
        self.contexts = {n: Context(run_id, n, cfg, RecordDict(), run_config)
                         for n, cfg in node_configs.items()}
        self.silent = set(silent)
        self.sent = []

    def get_node_ids(self):
        return list(self.configs)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            if m.metadata.dst_node_id in self.silent:
                continue
            from flwr.supercore.task_identity import TaskIdentity
            TaskIdentity.node_id = m.metadata.dst_node_id   # the node's process
            reply = client_app.app(m, self.contexts[m.metadata.dst_node_id])
            TaskIdentity.node_id = 1                        # back to the server's
            assert reply.metadata.src_node_id == m.metadata.dst_node_id
            replies.append(reply)
        return replies


def shard(tmp_path, i, n_parts=3, test=False):
    x, y = demo_shard(i, n_parts, n=300, seed=1 if test else 0)
    p = tmp_path / f"{'test' if test else 'train'}{i}.npz"
    np.savez(p, x=x, labels=y)
    return str(p)


def settings(tmp_path, **kw):
    base = dict(num_rounds=3, local_steps=7, batch_size=16, out_dir=str(tmp_path / "out"),
                min_available_nodes=1, client_eval=False, round_timeout=5.0)
    base.update(kw)
    return RunSettings(**base)


def test_one_node_fedavg_equals_a_plain_pyedge_run(tmp_path):
    run = settings(tmp_path)
    data = shard(tmp_path, 0)
    grid = LoopbackGrid({11: {"data-path": data}}, run.to_config())
    store = run_federation(grid, run)
    last = store.latest()
    assert last[0] == 3
    plain = plain_run(run, data, run.num_rounds * run.local_steps)
    worst = max(float(np.abs(last[1][k] - plain[k]).max()) for k in plain)
    assert worst <= 1e-6, worst
    assert set(plain) == set(last[1])
    # the adapters moved (a test that would also pass with nothing trained is no test)
    init = LocalTrainer(run, data).arrays()
    assert max(float(np.abs(plain[k] - init[k]).max()) for k in plain) > 1e-3


def test_resume_after_a_server_restart_and_silent_nodes(tmp_path):
    run = settings(tmp_path, num_rounds=2, min_available_nodes=2, client_eval=True)
    cfgs = {i + 1: {"data-path": shard(tmp_path, i), "test-path": shard(tmp_path, i, test=True)}
            for i in range(3)}
    grid = LoopbackGrid(cfgs, run.to_config(), silent={3})
    run_federation(grid, run)
    store = RoundStore(run.out_dir)
    log = store.metrics()
    assert [m["round"] for m in log] == [1, 2]
    assert log[0]["nodes"] == 3 and log[0]["replies"] == 2 and log[0]["dropped"] == [3]
    assert log[1]["nodes"] == 2                    # the silent node is not waited for again
    # the ClientApp runs in this process here: it reports torch only if an earlier test in the
    # same pytest process imported it (test_fleet_processes checks a real SuperNode's process)
    assert log[0]["client-torch-imported"] == int("torch" in sys.modules)
    r2 = store.latest()[1]

    # the server restarts (a new run, new node contexts) with more rounds: it starts at round 3
    # from round 2's adapters
    run3 = settings(tmp_path, num_rounds=3, min_available_nodes=2)
    grid3 = LoopbackGrid(cfgs, run3.to_config(), run_id=2)
    run_federation(grid3, run3)
    assert [m["round"] for m in store.metrics()] == [1, 2, 3]
    assert [m["resumed-from"] for m in store.metrics()] == [0, 0, 2]
    first = grid3.sent[0]
    assert first.content["config"]["server-round"] == 3
    sent = {k: v.numpy() for k, v in first.content["arrays"].items()}
    assert all(np.array_equal(sent[k], r2[k]) for k in r2)
    info = json.loads((store.round_dir(3) / "round.json").read_text())
    assert info["aggregation"] == "fedavg" and info["settings"]["num-rounds"] == 3

    # nothing left to do: a rerun writes nothing
    run_federation(LoopbackGrid(cfgs, run3.to_config(), run_id=3), run3)
    assert len(store.metrics()) == 3


def test_too_few_replies_stop_the_run_clearly(tmp_path):
    run = settings(tmp_path, min_train_nodes=2)
    grid = LoopbackGrid({1: {"data-path": shard(tmp_path, 0)}, 2: {"data-path": shard(tmp_path, 1)}},
                        run.to_config(), silent={2})
    with pytest.raises(RuntimeError, match="min-train-nodes"):
        run_federation(grid, run)
    assert RoundStore(run.out_dir).latest() is None


class CorruptingGrid(LoopbackGrid):
    """A LoopbackGrid whose node `bad` answers "train" with NaN tensors (a diverged board)."""

    def __init__(self, *a, bad, **kw):
        super().__init__(*a, **kw)
        self.bad = bad

    def send_and_receive(self, messages, timeout=None):
        from pyedge.fleet.records import from_array_record, to_array_record
        replies = super().send_and_receive(messages, timeout)
        for r in replies:
            if r.metadata.src_node_id == self.bad and "arrays" in r.content:
                r.content["arrays"] = to_array_record({
                    k: np.full_like(v, np.nan)
                    for k, v in from_array_record(r.content["arrays"]).items()})
        return replies


def test_a_non_finite_reply_is_dropped_not_averaged(tmp_path):
    run = settings(tmp_path, num_rounds=1)
    cfgs = {i + 1: {"data-path": shard(tmp_path, i)} for i in range(2)}
    store = run_federation(CorruptingGrid(cfgs, run.to_config(), bad=2), run)
    rnd, arrays = store.latest()
    assert rnd == 1 and all(np.all(np.isfinite(v)) for v in arrays.values())
    assert store.metrics()[0]["replies"] == 1


def test_node_data_is_checked_against_the_model(tmp_path):
    """A node's .npz goes through pyedge's data checks: a label outside the demo's 4 classes,
    or arrays of different lengths, are DataErrors naming the file, not a crash mid-round."""
    from pyedge.data import DataError
    run = settings(tmp_path)
    x, y = demo_shard(0, 3, n=50)
    bad = tmp_path / "bad_labels.npz"
    np.savez(bad, x=x, labels=np.where(np.arange(len(y)) == 7, 9, y))
    with pytest.raises(DataError, match="bad_labels.npz.*label 9.*out of range"):
        LocalTrainer(run, str(bad))
    short = tmp_path / "short.npz"
    np.savez(short, x=x, labels=y[:-1])
    with pytest.raises(DataError, match="short.npz.*disagree on the number of records"):
        LocalTrainer(run, str(short))


def test_exact_aggregation_runs_and_logs_the_factor_error(tmp_path):
    run = settings(tmp_path, num_rounds=1, aggregation="exact")
    cfgs = {i + 1: {"data-path": shard(tmp_path, i)} for i in range(3)}
    store = run_federation(LoopbackGrid(cfgs, run.to_config()), run)
    err = store.metrics()[0]["factor-error"]
    assert set(err) == {"layers.0", "layers.2"}
    for e in err.values():
        assert e["exact"] <= e["fedavg"] + 1e-9


def test_global_adapters_load_in_peft(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel

    from pyedge.demo import load_torch_model
    from pyedge.fleet.local import make_session
    run = settings(tmp_path, num_rounds=1)
    data = shard(tmp_path, 0)
    store = run_federation(LoopbackGrid({1: {"data-path": data}}, run.to_config()), run)
    model = PeftModel.from_pretrained(load_torch_model(), str(store.round_dir(1)))
    x = np.load(data)["x"][:16]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    sess = make_session(run)
    for k, v in store.latest()[1].items():
        sess.trainable_parameters()[k][...] = v
    ours = sess.run({"x": x})[sess.output_name]
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_unknown_run_setting_is_refused():
    with pytest.raises(ValueError, match="unknown fleet run setting 'num-round'"):
        RunSettings.from_config({"num-round": 3})
    s = RunSettings.from_config({"num-rounds": 4, "keep-optimizer-state": False, "lr": 1})
    assert s.num_rounds == 4 and s.keep_optimizer_state is False and s.lr == 1.0
