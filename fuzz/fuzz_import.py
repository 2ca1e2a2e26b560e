"""atheris harness: raw bytes -> load_onnx -> TrainingSession(loss=None) -> run.

    python fuzz/fuzz_import.py fuzz/corpus_import -max_total_time=300 -timeout=20 -rss_limit_mb=3072

The corpus directory is seeded from the bundled and built-in seed models on first use.
Documented exceptions (pyedge.PyedgeError, ModelLoadError, ValueError) are fine; any other
exception, a crash, an abort or a run over -timeout seconds is a finding.
"""
import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with atheris.instrument_imports(include=["pyedge"]):
    from fuzz import common
    import pyedge  # noqa: F401


def TestOneInput(data: bytes) -> None:
    common.checked(data)


def main():
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for d in corpus:
        if not os.path.isdir(d) or not os.listdir(d):
            common.write_corpus(d)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
