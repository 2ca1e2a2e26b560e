"""The ClientApp: what a device runs when the server asks it to train or evaluate.

Message in (from the ServerApp): "arrays" (ArrayRecord, the global trainable tensors by ONNX
name) and "config" (ConfigRecord: "server-round"). Reply: "arrays" (after `local-steps` steps
on the node's data) and "metrics" (MetricRecord: "num-examples", the weight the server uses,
"train-loss", and what the process cost: "torch-imported" 0/1, "vmhwm-mib").

Node settings (`flower-supernode --node-config`):
  data-path      .npz of the node's training data (arrays named after the graph inputs + labels)
  test-path      .npz evaluated on "evaluate" messages (default: the training data)
  model-path     this board's copy of the ONNX model (default: the run's `model`)
  partition-id / num-partitions   without data-path: a non-IID shard of the demo task
                 (simulation with `flwr run`, or a quick try on boards without data)
  reply-delay    seconds to wait before replying to "train" (simulates a slow board; tests)

The node's AdamW moments and step counter live in the run's Context.state between rounds
(`keep-optimizer-state`), so rounds continue one optimizer instead of restarting it.

Imports numpy, flwr and pyedge only: no torch on the device.
"""
from __future__ import annotations

import sys
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pyedge.fleet.deploy import peak_rss_mib
from pyedge.fleet.records import from_array_record, to_array_record
from pyedge.fleet.settings import RunSettings

app = ClientApp()

OPT_STATE = "pyedge-optimizer"


def _node_data(context: Context, run: RunSettings, key: str):
    """The node's data file for `key` ("data-path" / "test-path"); demo shards are written to
    a temporary file once per process."""
    cfg = context.node_config
    if key in cfg and cfg[key]:
        return str(cfg[key])
    if key == "test-path" and cfg.get("data-path"):
        return str(cfg["data-path"])
    if "partition-id" not in cfg:
        raise ValueError(f"node {context.node_id}: give --node-config 'data-path=\"...\"' (or "
                         "partition-id/num-partitions for the demo task)")
    import os
    import tempfile

    import numpy as np

    from pyedge.fleet.local import demo_shard
    pid, num = int(cfg["partition-id"]), int(cfg.get("num-partitions", 3))
    split = "test" if key == "test-path" else "train"
    path = os.path.join(tempfile.gettempdir(), f"pyedge-fleet-demo-{split}-{pid}-{num}-{run.seed}.npz")
    if not os.path.exists(path):
        x, y = demo_shard(pid, num, seed=run.seed + (1 if split == "test" else 0))
        np.savez(path + ".tmp.npz", x=x, labels=y)
        os.replace(path + ".tmp.npz", path)
    return path


def _trainer(msg: Message, context: Context, key: str):
    from pyedge.fleet.local import LocalTrainer
    run = RunSettings.from_config(context.run_config)
    trainer = LocalTrainer(run, _node_data(context, run, key),
                           model=context.node_config.get("model-path") or None)
    trainer.set_arrays(from_array_record(msg.content["arrays"]))
    return run, trainer


def _process_metrics() -> dict:
    return {"torch-imported": int("torch" in sys.modules), "vmhwm-mib": peak_rss_mib()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, trainer = _trainer(msg, context, "data-path")
    if run.keep_optimizer_state and OPT_STATE in context.state:
        trainer.set_optimizer_state(from_array_record(context.state[OPT_STATE]))
    loss = trainer.train(run.local_steps)
    if run.keep_optimizer_state:
        context.state[OPT_STATE] = to_array_record(trainer.optimizer_state())
    delay = float(context.node_config.get("reply-delay", 0) or 0)
    if delay > 0:
        time.sleep(delay)
    metrics = {"num-examples": trainer.num_examples, "train-loss": loss,
               "step-count": trainer.session.step_count, **_process_metrics()}
    content = RecordDict({"arrays": to_array_record(trainer.arrays()),
                          "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, trainer = _trainer(msg, context, "test-path")
    res = trainer.evaluate(_node_data(context, trainer.run, "test-path"))
    metrics = {"num-examples": res["num-examples"], "eval-loss": res["loss"],
               "eval-accuracy": res["accuracy"], **_process_metrics()}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
