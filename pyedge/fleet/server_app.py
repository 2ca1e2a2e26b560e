"""The ServerApp: rounds of "train on your data" to the connected devices, aggregation of their
adapters, evaluation, and the global adapters written per round.

Its own round loop (not `Strategy.start`) because it must (a) start at the round after the
last one on disk when a restarted server runs the federation again, (b) aggregate LoRA factors
with the rule asked for (pyedge/fleet/aggregate.py), and (c) keep going when a device dies:
a node that has not replied within `round-timeout` seconds is dropped from the round (and
from the rest of the run: a SIGKILLed board stays "connected" on the SuperLink until its
heartbeats expire, and would stall every later round); a round counts with at least
`min-train-nodes` replies; a round starts once `min-available-nodes` are connected.
Run settings: pyedge/fleet/settings.py (`--run-config` keys).
"""
from __future__ import annotations

import time
from logging import INFO, WARNING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from pyedge.fleet.aggregate import aggregate, factor_errors
from pyedge.fleet.records import from_array_record, to_array_record
from pyedge.fleet.settings import RunSettings
from pyedge.fleet.store import RoundStore

app = ServerApp()


def wait_for_nodes(grid: Grid, need: int, timeout: float, exclude=frozenset()) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(set(grid.get_node_ids()) - set(exclude))
        if len(nodes) >= need:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} node(s) connected after {timeout:.0f} s, "
                               f"min-available-nodes is {need}")
        time.sleep(0.5)


def _send(grid: Grid, nodes, kind: str, arrays, rnd: int, timeout: float):
    """(replies with content, nodes that failed or did not answer in time)."""
    record = to_array_record(arrays)
    msgs = [Message(content=RecordDict({"arrays": record,
                                        "config": ConfigRecord({"server-round": rnd})}),
                    message_type=kind, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    ok = [r for r in replies if not r.has_error()]
    for r in replies:
        if r.has_error():
            log(WARNING, "round %d %s: node %d failed: %s", rnd, kind, r.metadata.src_node_id,
                r.error.reason)
    answered = {r.metadata.src_node_id for r in ok}
    return ok, [n for n in nodes if n not in answered]


def _reply_problem(reply, params) -> str | None:
    """Why a node's train reply cannot be aggregated (None: it can): the tensors must be the
    server session's trainable ones (names, shapes), finite, with a positive example count.
    One bad node (diverged to NaN, other adapter settings, a bug) must not poison or stop
    the federation: its reply is dropped from the round."""
    try:
        n = float(reply.content["metrics"]["num-examples"])
        arrays = from_array_record(reply.content["arrays"])
    except Exception as e:  # noqa: BLE001 - a malformed reply of any kind is one problem
        return f"malformed reply ({type(e).__name__}: {e})"
    if not (n > 0 and n < float("inf")):
        return f"num-examples is {n}"
    if set(arrays) != set(params):
        diff = sorted(set(arrays) ^ set(params))[:4]
        return f"its tensors differ from the server's ({diff}): other adapter settings"
    for k, v in arrays.items():
        if v.shape != params[k].shape:
            return f"'{k}' has shape {list(v.shape)}, the server's {list(params[k].shape)}"
        if v.dtype.kind != "f" or not np.all(np.isfinite(v)):
            return f"'{k}' holds non-finite or non-float values"
    return None


def _weighted(replies, key: str) -> float | None:
    vals = [(float(r.content["metrics"]["num-examples"]), float(r.content["metrics"][key]))
            for r in replies if key in r.content["metrics"]]
    total = sum(w for w, _ in vals)
    return sum(w * v for w, v in vals) / total if total else None


def run_federation(grid: Grid, run: RunSettings) -> RoundStore:
    from pyedge.fleet.local import evaluate_arrays, load_npz, lora_pairs, make_session
    session = make_session(run)   # the server's view: tensor names, LoRA layers, PEFT writer
    pairs = lora_pairs(session)
    store = RoundStore(run.out_dir)
    last = store.latest()
    if last is None:
        start, arrays = 0, {k: v.copy() for k, v in session.trainable_parameters().items()}
    else:
        start, arrays = last
        log(INFO, "resuming from round %d in %s", start, store.out)
    dropped: set[int] = set()
    for rnd in range(start + 1, run.num_rounds + 1):
        t0 = time.monotonic()
        nodes = wait_for_nodes(grid, run.min_available_nodes, run.wait_timeout, dropped)
        log(INFO, "round %d/%d: train on %d node(s)", rnd, run.num_rounds, len(nodes))
        replies, late = _send(grid, nodes, MessageType.TRAIN, arrays, rnd, run.round_timeout)
        if late:
            log(WARNING, "round %d: no reply from node(s) %s; dropped from this run", rnd, late)
            dropped.update(late)
        params = session.trainable_parameters()
        good = []
        for r in replies:
            why = _reply_problem(r, params)
            if why is None:
                good.append(r)
            else:
                log(WARNING, "round %d: reply of node %d dropped: %s", rnd,
                    r.metadata.src_node_id, why)
        replies = good
        if len(replies) < run.min_train_nodes:
            raise RuntimeError(f"round {rnd}: {len(replies)} node(s) replied, min-train-nodes "
                               f"is {run.min_train_nodes}")
        updates = [from_array_record(r.content["arrays"]) for r in replies]
        weights = [float(r.content["metrics"]["num-examples"]) for r in replies]
        arrays = aggregate(updates, weights, pairs, run.aggregation)
        errors = factor_errors(updates, weights, pairs) if len(updates) > 1 else {}

        live = [n for n in nodes if n not in dropped]
        ev = []
        if run.client_eval and live:
            ev, ev_late = _send(grid, live, MessageType.EVALUATE, arrays, rnd, run.round_timeout)
            dropped.update(ev_late)
        record = {
            "round": rnd, "resumed-from": start, "aggregation": run.aggregation,
            "nodes": len(nodes),
            "replies": len(replies), "dropped": sorted(dropped),
            "num-examples": sum(weights), "train-loss": _weighted(replies, "train-loss"),
            "eval-loss": _weighted(ev, "eval-loss"), "eval-accuracy": _weighted(ev, "eval-accuracy"),
            "factor-error": errors,
            "client-torch-imported": max(int(r.content["metrics"]["torch-imported"])
                                         for r in replies + ev),
            "client-vmhwm-mib": max(float(r.content["metrics"]["vmhwm-mib"])
                                    for r in replies + ev),
        }
        if run.eval_data:
            for k, v in arrays.items():
                session.trainable_parameters()[k][...] = v
            inputs, labels = load_npz(run.eval_data, session)
            g = evaluate_arrays(session, inputs, labels)
            record.update({"global-loss": g["loss"], "global-accuracy": g["accuracy"]})
        record["seconds"] = time.monotonic() - t0
        store.write_round(rnd, arrays, session, {"aggregation": run.aggregation,
                                                 "settings": run.to_config()})
        store.log_metrics(record)
        log(INFO, "round %d done: %s", rnd, {k: record[k] for k in
                                              ("replies", "train-loss", "eval-accuracy")})
    return store


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunSettings.from_config(context.run_config))
