"""`pyedge fleet`: federated LoRA over many devices with Flower (pyedge/fleet/).

    pyedge fleet local        a SuperLink + N SuperNodes on this machine (TLS, node keys), the
                              pyedge app run on them with `flwr run`, until the last round
    pyedge fleet credentials  a CA, the SuperLink's certificate and N SuperNode key pairs
    pyedge fleet app-dir      the Flower app folder, for `flwr run "$(pyedge fleet app-dir)" ...`

The Flower commands themselves (`flower-superlink`, `flower-supernode`, `flwr run`) are what
real boards use; `local` only starts them for you.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_commands(sub, common) -> None:
    f = sub.add_parser("fleet", parents=[common], help="federated LoRA on many devices (Flower)",
                       description=__doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fs = f.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    fs.required = True

    lo = fs.add_parser("local", parents=[common], help="a local federation of N SuperNodes")
    lo.add_argument("--nodes", type=int, default=3)
    lo.add_argument("--rounds", type=int, default=3)
    lo.add_argument("--data", default=None,
                    help="comma-separated .npz files, one per node (default: non-IID shards "
                         "of the demo task)")
    lo.add_argument("--out", default="pyedge-fleet", help="folder for logs, keys, results")
    lo.add_argument("--run-config", default="",
                    help="more run settings, Flower's form: 'local-steps=30 aggregation=\"exact\"'")
    lo.add_argument("--insecure", action="store_true", help="no TLS and no node keys")
    lo.add_argument("--timeout", type=float, default=900.0)
    lo.set_defaults(func=cmd_fleet_local)

    cr = fs.add_parser("credentials", parents=[common],
                       help="CA + SuperLink certificate + SuperNode key pairs")
    cr.add_argument("--out", required=True)
    cr.add_argument("--hosts", default="127.0.0.1,localhost",
                    help="the SuperLink's addresses, for its certificate (IPs or names)")
    cr.add_argument("--nodes", type=int, default=1)
    cr.set_defaults(func=cmd_fleet_credentials)

    ad = fs.add_parser("app-dir", parents=[common], help="print the Flower app folder")
    ad.set_defaults(func=lambda args: print(_app_dir()) or 0)


def _app_dir() -> str:
    from pyedge.fleet import APP_DIR
    return str(APP_DIR)


def _say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def cmd_fleet_credentials(args) -> int:
    from pyedge.fleet.deploy import make_certificates, make_node_key
    out = Path(args.out)
    certs = make_certificates(out, hosts=[h.strip() for h in args.hosts.split(",") if h.strip()])
    _say(f"SuperLink: {certs['ca']} (give to every node), {certs['cert']}, {certs['key']}")
    for i in range(args.nodes):
        priv, pub = make_node_key(out, f"node{i}")
        _say(f"SuperNode {i}: {priv} (stays on the board), {pub} (register it)")
    return 0


def cmd_fleet_local(args) -> int:
    import numpy as np

    from pyedge.fleet.deploy import LocalFleet
    from pyedge.fleet.local import demo_shard
    from pyedge.fleet.store import RoundStore
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = [str(Path(p).resolve()) for p in args.data.split(",") if p.strip()]
        tests = [None] * len(data)
        if len(data) != args.nodes:
            raise ValueError(f"--data names {len(data)} file(s) for {args.nodes} node(s)")
    else:
        data, tests = [], []
        for i in range(args.nodes):
            for split, seed, dest in (("train", 0, data), ("test", 1, tests)):
                x, y = demo_shard(i, args.nodes, seed=seed)
                p = out / f"node{i}-{split}.npz"
                np.savez(p, x=x, labels=y)
                dest.append(str(p))
    rc = _run_config(args.run_config)
    rc.update({"num-rounds": args.rounds, "out-dir": str(out / "results")})
    rc.setdefault("min-available-nodes", args.nodes)
    store = RoundStore(out / "results")
    done_before = len(store.metrics())
    secure = not args.insecure
    with LocalFleet(out / "processes", tls=secure, auth=secure) as fleet:
        fleet.start_superlink()
        _say(f"SuperLink on 127.0.0.1:{fleet.port} ({'TLS, node keys' if secure else 'insecure'})")
        for i, (p, t) in enumerate(zip(data, tests)):
            key = fleet.node_key(f"node{i}") if secure else None
            cfg = {"data-path": p, **({"test-path": t} if t else {})}
            fleet.start_supernode(f"node{i}", cfg, key)
        deadline = time.monotonic() + args.timeout
        while fleet.online_nodes() < args.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"SuperNodes not online; logs in {out / 'processes'}")
            time.sleep(1)
        _say(f"{args.nodes} SuperNodes online; flwr run {_app_dir()}")
        fleet.run(rc)
        seen = done_before
        while True:
            log = store.metrics()
            for m in log[seen:]:
                acc = m.get("eval-accuracy")
                _say(f"round {m['round']}: {m['replies']}/{m['nodes']} node(s), train loss "
                     f"{m['train-loss']:.4f}" + (f", accuracy on the nodes' test data {acc:.1%}" if acc is not None else ""))
            seen = len(log)
            latest = store.latest()
            if latest is not None and latest[0] >= args.rounds:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the federation did not finish in {args.timeout:.0f} s; "
                                   f"logs in {out / 'processes'}")
            time.sleep(1)
    _say(f"global adapters (PEFT) per round in {store.rounds}; metrics in {store.out / 'metrics.jsonl'}")
    return 0


def _run_config(text: str) -> dict:
    """Flower's `k1=v1 k2="v2"` form (TOML values) to a dict."""
    if not text.strip():
        return {}
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore
    import shlex
    return tomllib.loads("\n".join(shlex.split(text, posix=False)))
