"""`pyedge ARGS` run in the test's own process: pyedge.cli.main with its exit code, stdout and
stderr captured, optionally in another working directory. A new interpreter per call costs
~2 s of start-up and imports on the test machines; tests that need a real process (kills,
`python -m pyedge`'s own contract) keep subprocess (tests/test_cli.py, test_crash_safety.py)."""
import contextlib
import io
from types import SimpleNamespace


def run_cli(*args, cwd=None):
    from pyedge.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:   # argparse's usage errors
            rc = e.code
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())
