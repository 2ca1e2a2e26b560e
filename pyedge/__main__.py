"""`python -m pyedge ...` is the `pyedge` command."""
import sys

from pyedge.cli import main

sys.exit(main())
