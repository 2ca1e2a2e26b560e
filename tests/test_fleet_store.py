"""The server's round folders (pyedge/fleet/store.py): a round written again after a restart
replaces the old one without a window in which a half-deleted round is on disk."""
import json
import shutil

import numpy as np
import pytest

from pyedge.fleet.store import RoundStore


class FakeSession:
    """What write_round needs of a session: the trainable tensors and a PEFT writer."""

    def __init__(self):
        self.params = {"layer.lora_A.weight": np.zeros((2, 3), np.float32)}

    def trainable_parameters(self):
        return self.params

    def save_adapters(self, folder):
        (folder / "adapter_config.json").write_text("{}")


def test_rounds_are_written_whole_and_the_latest_is_read_back(tmp_path):
    store = RoundStore(tmp_path)
    for rnd in (1, 2):
        store.write_round(rnd, {"layer.lora_A.weight": np.full((2, 3), rnd, np.float32)},
                          FakeSession(), {"aggregation": "fedavg"})
    rnd, arrays = RoundStore(tmp_path).latest()
    assert rnd == 2 and np.all(arrays["layer.lora_A.weight"] == 2)
    assert json.loads((store.round_dir(2) / "round.json").read_text())["round"] == 2
    assert sorted(p.name for p in store.rounds.iterdir()) == ["round-0001", "round-0002"]


def test_a_kill_while_replacing_a_round_leaves_a_readable_latest(tmp_path, monkeypatch):
    store = RoundStore(tmp_path)
    store.write_round(3, {"layer.lora_A.weight": np.ones((2, 3), np.float32)}, FakeSession(),
                      {})

    class Killed(BaseException):
        pass

    real_rmtree = shutil.rmtree

    def rmtree_then_die(path, *a, **kw):   # deletes the tensors first, then the kill comes
        if (path / "global.npz").exists():
            (path / "global.npz").unlink()
            raise Killed()
        return real_rmtree(path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree_then_die)
        with pytest.raises(Killed):
            store.write_round(3, {"layer.lora_A.weight": np.full((2, 3), 7, np.float32)},
                              FakeSession(), {})
    rnd, arrays = RoundStore(tmp_path).latest()   # the restarted server
    assert rnd == 3 and np.all(arrays["layer.lora_A.weight"] == 7)
    assert not [p for p in store.rounds.iterdir() if p.name.startswith(".")]
