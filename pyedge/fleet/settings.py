"""A federation's settings, read the Flower way.

Run settings (the same for every node) come from the app's pyproject.toml
`[tool.flwr.app.config]`, overridden with `flwr run ... --run-config 'key=value ...'`; node
settings (what differs per device: its data, its copy of the model) from
`flower-supernode --node-config 'data-path="..." ...'`. Keys are Flower's kebab-case.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping


def _split(v: Any) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [s.strip() for s in str(v).split(",") if s.strip()]


@dataclasses.dataclass
class RunSettings:
    """[tool.flwr.app.config] of pyedge/fleet/app/pyproject.toml (defaults mirror it)."""
    model: str = "demo"                  # path to the exported ONNX file, or "demo"
    num_rounds: int = 3
    local_steps: int = 20                # optimizer steps per node per round
    batch_size: int = 32
    lr: float = 1e-2
    weight_decay: float = 0.01
    lora_r: int = 4
    lora_alpha: float = 8.0
    target: str = "layers.0,layers.2"    # PyTorch module names to adapt with LoRA
    train: str = "layers.4.*"            # whole tensors trained too ("" for none)
    loss: str = "cross_entropy"
    aggregation: str = "fedavg"          # "fedavg" (factors) or "exact" (products + SVD)
    keep_optimizer_state: bool = True    # AdamW moments stay on the node between rounds
    min_available_nodes: int = 2         # wait for this many connected nodes before a round
    min_train_nodes: int = 1             # a round needs this many replies to count
    round_timeout: float = 120.0         # seconds to wait for replies; late nodes are dropped
    wait_timeout: float = 300.0          # seconds to wait for min-available-nodes
    out_dir: str = "fleet-out"           # global adapters per round + metrics.jsonl
    eval_data: str = ""                  # optional server-side test set (.npz)
    client_eval: bool = True             # also ask the nodes to evaluate on their test data
    seed: int = 0
    threads: int = 1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "RunSettings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kw = {}
        for key, value in cfg.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown fleet run setting '{key}'; known: "
                                 f"{', '.join(k.replace('_', '-') for k in known)}")
            typ = type(getattr(cls, name))
            kw[name] = (value if typ is str else
                        (str(value).lower() in ("1", "true", "yes")) if typ is bool and isinstance(value, str)
                        else typ(value))
        return cls(**kw)

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    @property
    def targets(self) -> list[str]:
        return _split(self.target)

    @property
    def train_patterns(self) -> list[str]:
        return _split(self.train)


def model_path(model: str) -> str:
    """The ONNX file a setting names ("demo": the bundled sensor classifier)."""
    if model == "demo":
        from pyedge.demo import model_path as demo_model
        return str(demo_model())
    p = Path(model).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"fleet: model file '{model}' not found on this machine")
    return str(p)
