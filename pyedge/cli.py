"""The `pyedge` command line: export, inspect, train, eval, generate, merge, quantize,
fleet, demo.

Every expected failure prints one line ``pyedge: error: <message>`` to stderr and exits with
2 (usage: bad flags or options) or 1 (runtime: missing file, corrupt model, unsupported op,
data that does not fit the model, non-finite loss, ...). ``--debug`` shows the traceback.

Each group of subcommands lives in its own module with an ``add_commands(sub, common)`` that
builds its parsers (cli_export, cli_inspect, cli_train, cli_generate,
cli_fleet); this file composes them and owns the
error boundary.
"""
from __future__ import annotations

import argparse
import os
import sys

from pyedge import cli_export, cli_fleet, cli_generate, cli_inspect, cli_train
from pyedge.cli_common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE,  # noqa: F401
                               Parser, UsageError, fmt_bytes, one_line, out)

# kept importable from here: tests and scripts use them
from pyedge.cli_inspect import inspect_report  # noqa: F401,E402
from pyedge.cli_train import read_toml_config, train_config_from_args  # noqa: F401,E402


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show Python tracebacks on errors")

    p = Parser(prog="pyedge", parents=[common],
               description="Fine-tune ONNX models on edge CPUs: LoRA adapters in, PEFT out.")
    from pyedge import __version__
    p.add_argument("--version", action="version", version=f"pyedge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cli_export.add_commands(sub, common)
    cli_inspect.add_commands(sub, common)
    cli_train.add_commands(sub, common)
    cli_generate.add_commands(sub, common)
    cli_fleet.add_commands(sub, common)

    # demo -----------------------------------------------------------------------------------
    d = sub.add_parser("demo", parents=[common], help="end-to-end fine-tuning on a bundled model",
                       description="Fine-tune a bundled sensor classifier on a shifted task: "
                                   "accuracy before/after, PEFT adapters, PyTorch check.")
    d.add_argument("--out", default="pyedge-demo", help="output directory (default ./pyedge-demo)")
    d.add_argument("--steps", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--no-torch-check", dest="torch_check", action="store_false",
                   help="skip loading the adapters back into PyTorch")
    d.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    from pyedge.demo import run_demo
    run_demo(out=args.out, steps=args.steps, seed=args.seed, threads=args.threads,
             torch_check=args.torch_check)
    return EXIT_OK


def _classify(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, one-line message) for an expected failure; None for a bug."""
    import pyedge
    from pyedge.checkpoint import CheckpointError
    from pyedge.data import DataError
    from pyedge.train import ConfigError, TrainingError

    if isinstance(exc, (UsageError, ConfigError)):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError)) and exc.filename is not None:
        return EXIT_RUNTIME, f"{exc.filename}: {exc.strerror}"
    if isinstance(exc, (DataError, pyedge.ModelLoadError, pyedge.PyedgeError, CheckpointError,
                        TrainingError, FileNotFoundError, OSError)):
        return EXIT_RUNTIME, str(exc)
    mod = type(exc).__module__ or ""
    if mod.startswith("pyedge.export") or type(exc).__name__ == "AdapterError":
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, ImportError):
        return EXIT_RUNTIME, f"cannot import {exc.name or ''}: {exc}".replace(" : ", ": ")
    if isinstance(exc, RuntimeError) and type(exc) is RuntimeError:
        return EXIT_RUNTIME, str(exc)
    if isinstance(exc, (ValueError, TypeError)) and type(exc) in (ValueError, TypeError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, ValueError):
        return EXIT_RUNTIME, str(exc)
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("PYEDGE_DEBUG") == "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\npyedge: interrupted (a run can continue with --resume)\n")
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            raise
        cls = _classify(exc)
        if cls is None:
            code, msg = EXIT_RUNTIME, (f"internal error: {type(exc).__name__}: {exc} "
                                       "(rerun with --debug for the traceback)")
        else:
            code, msg = cls
        sys.stderr.write(f"pyedge: error: {one_line(msg) or type(exc).__name__}\n")
        sys.stderr.flush()
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
