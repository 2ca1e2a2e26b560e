"""What one device does in a round, without Flower: load the global adapters, take N optimizer
steps on its own data, hand back the adapters; evaluate. numpy + pyedge only (no torch), so the
same code is the ClientApp's body, the server's view of the model, and the reference "plain
pyedge run" the tests compare a one-node federation with.

Batches are a pure function of (seed, step index): the node keeps a step counter, so a run cut
into rounds draws exactly the batches an uncut run of the same steps draws.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from pyedge.fleet.settings import RunSettings, model_path

DATA_INPUT = "x"  # the demo model's input; other models: the npz arrays named after the inputs


def make_session(run: RunSettings, model: str | None = None):
    import pyedge
    lora = pyedge.LoraConfig(r=run.lora_r, alpha=run.lora_alpha, target_modules=run.targets,
                             seed=run.seed)
    return pyedge.TrainingSession(model_path(model or run.model), lora=lora,
                                  train=run.train_patterns, loss=run.loss,
                                  optimizer=pyedge.AdamW(lr=run.lr, weight_decay=run.weight_decay),
                                  seed=run.seed, threads=run.threads)


def lora_pairs(session) -> list[tuple[str, str]]:
    return [(s.lora_a, s.lora_b) for s in session.lora_sites]


def load_npz(path, session=None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(inputs by name, labels) of a .npz data file (arrays named after the graph inputs).
    With `session`, the file is checked against its inputs and loss as `pyedge train` checks
    data (pyedge/data.py: shapes, dtypes, record counts, finite values, labels in range; a
    DataError naming the file and array), and the arrays come in the graph's dtypes."""
    file = Path(path).expanduser()
    if session is not None:
        from pyedge.data import DataSpec, load_dataset
        ds = load_dataset(file, DataSpec.from_session(session))
        inputs, labels = ds.batch(np.arange(len(ds)))
        return inputs, labels
    with np.load(file, allow_pickle=False) as z:
        if "labels" not in z.files:
            raise ValueError(f"{path}: no 'labels' array")
        inputs = {k: z[k] for k in z.files if k != "labels"}
        return inputs, z["labels"]


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of batch number `step` (0-based): epochs are seeded permutations of range(n),
    consumed batch by batch; a last short batch of an epoch is skipped."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]


class LocalTrainer:
    """One node's training state: a session, its data and a step counter."""

    def __init__(self, run: RunSettings, data_path, model: str | None = None):
        self.run = run
        self.session = make_session(run, model)
        self.inputs, self.labels = load_npz(data_path, self.session)
        self.num_examples = int(len(self.labels))
        if self.num_examples == 0:
            raise ValueError(f"{data_path}: no records")

    # --- tensors --------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self.session.trainable_parameters().items()}

    def set_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        params = self.session.trainable_parameters()
        if set(arrays) != set(params):
            raise ValueError(f"global adapters carry {sorted(arrays)}, this node trains "
                             f"{sorted(params)}: the run settings differ")
        for k, v in arrays.items():
            if v.shape != params[k].shape:
                raise ValueError(f"'{k}': global shape {v.shape}, local {params[k].shape}")
            params[k][...] = v

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """Flat {"<tensor>/<slot>": array} of the AdamW moments, plus the step counter."""
        flat = {f"{t}/{slot}": np.array(a) for t, slots in self.session.optimizer_state().items()
                for slot, a in slots.items()}
        flat["step_count"] = np.array([self.session.step_count], np.int64)
        return flat

    def set_optimizer_state(self, flat: Mapping[str, np.ndarray]) -> None:
        state = self.session.optimizer_state()
        for key, value in flat.items():
            if key == "step_count":
                self.session.step_count = int(value[0])
                continue
            t, slot = key.rsplit("/", 1)
            state[t][slot][...] = value

    # --- work -----------------------------------------------------------------------------
    def train(self, steps: int) -> float:
        """`steps` optimizer steps from the node's step counter; mean loss."""
        losses = []
        start = self.session.step_count
        for i in range(start, start + steps):
            rows = batch_indices(self.num_examples, self.run.batch_size, self.run.seed, i)
            losses.append(self.session.step({k: v[rows] for k, v in self.inputs.items()},
                                            self.labels[rows]))
        return float(np.mean(losses)) if losses else float("nan")

    def evaluate(self, data_path=None) -> dict[str, float]:
        inputs, labels = (self.inputs, self.labels) if data_path is None else \
            load_npz(data_path, self.session)
        return evaluate_arrays(self.session, inputs, labels)


def evaluate_arrays(session, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
                    batch_size: int = 256) -> dict[str, float]:
    """{"loss", "accuracy", "num-examples"} of a classifier session on (inputs, labels)."""
    n = len(labels)
    correct, nll = 0, 0.0
    for s in range(0, n, batch_size):
        out = session.run({k: v[s:s + batch_size] for k, v in inputs.items()})[session.output_name]
        y = labels[s:s + batch_size]
        z = out.astype(np.float64)
        z -= z.max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(y)), y].sum())
        correct += int((out.argmax(-1) == y).sum())
    return {"loss": nll / max(n, 1), "accuracy": correct / max(n, 1), "num-examples": float(n)}


def plain_run(run: RunSettings, data_path, steps: int) -> dict[str, np.ndarray]:
    """A plain pyedge run: one session, `steps` steps on one data file; its trainable tensors.
    What a one-node federation of fedavg rounds must reproduce."""
    t = LocalTrainer(run, data_path)
    t.train(steps)
    return t.arrays()


def demo_shard(partition_id: int, num_partitions: int, n: int = 600, seed: int = 0,
               classes_per_node: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """A non-IID shard of the demo's recalibrated-sensor task: node p sees only the classes
    p, p+1, ... (mod 4), `classes_per_node` of them. (x [n', 8], labels [n'])."""
    from pyedge.demo import CLASSES, make_sensor_data
    x, y = make_sensor_data(n * len(CLASSES) // classes_per_node, seed=5000 + 97 * seed + partition_id,
                            target=True)
    keep = {(partition_id + j) % len(CLASSES) for j in range(classes_per_node)}
    mask = np.isin(y, sorted(keep))
    return x[mask][:n], y[mask][:n]
