"""What every `pyedge` subcommand module shares: the usage error, one-line messages, output
and size formatting."""
from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(ValueError):
    """A bad command line or config file (exit code 2)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `pyedge: error: <msg> (see 'pyedge train --help')`."""

    def error(self, message):  # noqa: D401
        sys.stderr.write(f"pyedge: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def one_line(msg: str) -> str:
    return "; ".join(part.strip() for part in str(msg).strip().splitlines() if part.strip())


def out(msg=""):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"
