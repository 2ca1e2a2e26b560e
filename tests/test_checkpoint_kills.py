"""Checkpoint pruning survives SIGKILL at any moment.

Training runs (the bundled demo MLP, a checkpoint every step, keep-last 2) are SIGKILLed at
random moments, >= 50 times. After each kill every listed checkpoint loads (checksums
verified) and `latest` names one of them; the next start removes every temp/trash dir the
killed run left and resumes from the latest checkpoint; each series ends with a run that
completes. Test hooks slow each file write (2 ms) and each unlink of a pruned checkpoint (15 ms)
so that a fair share of the kills lands inside a save or a prune (the test counts them).

Children are forked from a multiprocessing forkserver that imported pyedge once: a fresh
interpreter takes seconds on a loaded 2-core machine, a fork milliseconds.
"""
import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from pyedge import checkpoint as ck

KILLS = int(os.environ.get("PYEDGE_PRUNE_KILLS", "60"))
SERIES = 6          # fresh output folders; the first kill of each may land in the first save
STALE = (".tmp-", ".trash-", ".old-", f".{ck.LATEST}.tmp-")


# ------------------------------------------------------------------------- in the child
def _run(out, data, max_steps, conn, hooks, die_at=None, resume=True):
    """pyedge training with --resume semantics; reports its log lines through `conn`.
    die_at=("write", name) / ("unlink", n): SIGKILL itself at that point of the first save /
    prune (the deterministic cases)."""
    from pyedge.demo import model_path
    from pyedge.train import TrainConfig, train

    if hooks:
        ck._after_file_write = lambda name: time.sleep(0.002)
        ck._after_unlink = lambda name: time.sleep(0.015)
    if die_at is not None:
        kind, arg = die_at
        count = [0]

        def die(name):
            count[0] += 1
            if (kind == "write" and name == arg) or (kind == "unlink" and count[0] == arg):
                os.kill(os.getpid(), signal.SIGKILL)
        if kind == "write":
            ck._after_file_write = die
        else:
            ck._after_unlink = die
    cfg = TrainConfig(model=str(model_path()), data=str(data), out=str(out), target=["layers.0"],
                      lora_r=2, batch_size=16, max_steps=max_steps, save_every=1,
                      keep_checkpoints=2, resume=resume, threads=1, seed=3, progress=False,
                      plot=False, log_every=1000)
    def say(msg):
        try:
            conn.send(msg)
        except OSError:  # the test stopped listening
            pass
    train(cfg, log=say)


# ------------------------------------------------------------------------- in the test
@pytest.fixture(scope="module")
def ctx():
    old = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "PYEDGE_NUM_THREADS")}
    os.environ.update(OPENBLAS_NUM_THREADS="1", PYEDGE_NUM_THREADS="1")
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["pyedge", "pyedge.train", __name__])
    yield c
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pyedge.demo import make_sensor_data
    x, y = make_sensor_data(64, seed=4, target=True)
    path = tmp_path_factory.mktemp("kills") / "train.npz"
    np.savez(path, x=x, labels=y)
    return path


def start(ctx, out, data, max_steps=10 ** 6, hooks=True, die_at=None, resume=True):
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_run, args=(out, data, max_steps, send, hooks, die_at, resume),
                    daemon=True)
    p.start()
    send.close()
    return p, recv


def first_message(p, recv, timeout=120.0) -> str:
    """The child's first log line: written after the lock and cleanup_temp, before training."""
    if not recv.poll(timeout):
        p.kill()
        raise AssertionError(f"the child said nothing in {timeout} s (exit code {p.exitcode})")
    return recv.recv()


def resumed_step(p, recv, timeout=120.0) -> int:
    """The step of the child's 'resumed from ... (step N, ...)' line (warnings come first)."""
    while True:
        msg = first_message(p, recv, timeout)
        if msg.startswith("resumed from"):
            return int(msg.split("(step ")[1].split(",")[0])


def stale(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.name.startswith(STALE)} if root.is_dir() else set()


def check_listed_checkpoints_load(root: Path) -> int | None:
    """Every listed checkpoint loads (checksums verified); `latest` names one of them.
    Returns the step a resume starts from (what `latest` names: a kill between a step-N
    rename and the pointer update leaves a complete step-N newer than `latest`), None when
    there is no checkpoint."""
    listed = ck.list_checkpoints(root)
    for step, path in listed:
        c = ck.load_checkpoint(path)      # raises CheckpointError on a half-deleted dir
        assert c.step == step
    name = ck.read_latest_pointer(root)
    if name is not None:
        assert name in {p.name for _, p in listed}, f"latest -> {name}, listed {listed}"
    path = ck.latest_checkpoint_path(root)
    return None if path is None else ck.load_checkpoint(path).step


def test_sigkill_at_random_moments_during_saves_and_prunes(ctx, data, tmp_path):
    rng = random.Random(20261206)
    kills = in_prune = in_write = fresh_stale = 0
    per_series = -(-KILLS // SERIES)
    for series in range(SERIES):
        out = tmp_path / f"run{series}"
        root = out / "checkpoints"
        left_behind: set[str] = set()
        expect_step = None
        for i in range(per_series):
            p, recv = start(ctx, out, data)
            msg = first_message(p, recv)
            # the new run cleaned up after the killed one and resumed from its latest
            assert not (left_behind & stale(root)), (left_behind & stale(root))
            if expect_step is None:
                assert msg.startswith("no checkpoint"), msg
            else:
                assert msg.startswith("resumed from") and f"(step {expect_step}," in msg, \
                    (msg, expect_step)
            # the first kill of a series comes early (before, inside or just after the first
            # save), later ones anywhere in the next few dozen saves
            time.sleep(rng.uniform(0.0, 0.05) if i == 0 else rng.uniform(0.0, 0.3))
            p.kill()
            p.join()
            assert p.exitcode == -signal.SIGKILL, p.exitcode
            kills += 1
            left_behind = stale(root)
            in_prune += any(n.startswith(".trash-") for n in left_behind)
            in_write += any(n.startswith(".tmp-") for n in left_behind)
            if not ck.list_checkpoints(root) and left_behind:
                fresh_stale += 1          # killed during the very first checkpoint write
            expect_step = check_listed_checkpoints_load(root)
        # the series ends with a run that completes (a changed max_steps only warns)
        done = (expect_step or 0) + 2
        p, recv = start(ctx, out, data, max_steps=done, hooks=False)
        first_message(p, recv)
        p.join(300)
        assert p.exitcode == 0, p.exitcode
        assert not stale(root)
        assert ck.load_latest(root).step == done
        assert [s for s, _ in ck.list_checkpoints(root)] == [done - 1, done]
        assert (out / "adapters" / ck.ADAPTERS).is_file()
    print(f"\n{kills} kills: {in_prune} inside a prune, {in_write} inside a write, "
          f"{fresh_stale} during a series' first save")
    assert kills >= 50
    if os.environ.get("PYEDGE_EMULATION") and min(in_prune, in_write) < 3:
        # Under qemu (scripts/arm64-check.sh sets PYEDGE_EMULATION) a training step takes 10-50x
        # longer while the kill moments above are wall-clock: the kills land before or between
        # saves. Every consistency check above ran; only where the kills fell is not asserted.
        pytest.skip(f"under emulation ({os.environ['PYEDGE_EMULATION']}) {kills} kills, "
                    f"{in_prune} inside a prune, {in_write} inside a write: wall-clock timing")
    assert in_prune >= 3 and in_write >= 3, (in_prune, in_write)


def test_kill_during_the_very_first_checkpoint_write(ctx, data, tmp_path):
    out = tmp_path / "first"
    root = out / "checkpoints"
    p, recv = start(ctx, out, data, hooks=False, die_at=("write", ck.OPTIMIZER))
    first_message(p, recv)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    assert any(n.startswith(".tmp-step-1-") for n in stale(root)) and not ck.has_checkpoints(root)
    (out / "adapters").mkdir()
    leftovers = [out / ".config.json.tmp-99999", out / "adapters" / ".adapter_model.safetensors.tmp-1"]
    for f in leftovers:  # what a kill inside atomic_write leaves
        f.write_bytes(b"half")
    p, recv = start(ctx, out, data, max_steps=3, hooks=False, resume=False)  # a plain start
    p.join(120)
    assert p.exitcode == 0 and not stale(root) and ck.load_latest(root).step == 3
    assert not any(f.exists() for f in leftovers)


@pytest.mark.parametrize("unlinked", [1, 3])
def test_kill_in_the_middle_of_a_prune(ctx, data, tmp_path, unlinked):
    """keep-last 2: the third save prunes step-1; die after `unlinked` of its 4 files."""
    out = tmp_path / "prune"
    root = out / "checkpoints"
    p, recv = start(ctx, out, data, hooks=False, die_at=("unlink", unlinked))
    first_message(p, recv)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL
    trash = [n for n in stale(root) if n.startswith(".trash-step-1-")]
    assert trash and len(os.listdir(root / trash[0])) == 4 - unlinked   # half-deleted
    assert [s for s, _ in ck.list_checkpoints(root)] == [2, 3]         # not listed
    assert check_listed_checkpoints_load(root) == 3
    p, recv = start(ctx, out, data, max_steps=5, hooks=False)
    assert resumed_step(p, recv) == 3
    p.join(120)
    assert p.exitcode == 0 and not stale(root)
    assert [s for s, _ in ck.list_checkpoints(root)] == [4, 5]


def test_prune_without_trash_rename_is_caught(tmp_path):
    """The check above fails for the old prune (rmtree in place, killed midway): a listed
    step-N that does not load. Simulated in-process: a half-removed checkpoint dir."""
    root = tmp_path / "checkpoints"
    for s in (1, 2):
        ck.save_checkpoint(root, s, {"a": np.full(3, s, np.float32)},
                           {"a": {"m": np.zeros(3, np.float32)}}, {}, {}, keep=0)
    (root / "step-1" / ck.OPTIMIZER).unlink()   # what an interrupted rmtree leaves
    with pytest.raises(ck.CheckpointError, match="missing"):
        check_listed_checkpoints_load(root)


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    root = tmp_path / "checkpoints"
    with ck.RunLock(root):
        with pytest.raises(ck.CheckpointError, match="another pyedge run"):
            with ck.RunLock(root):
                pass
    with ck.RunLock(root):  # released
        pass
    new = tmp_path / "fresh" / "checkpoints"
    with ck.RunLock(new):   # folders it made stay only if the run wrote something
        assert new.is_dir()
    assert not (tmp_path / "fresh").exists()
