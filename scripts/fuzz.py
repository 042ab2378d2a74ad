#!/usr/bin/env python3
"""Coverage-guided fuzzing of fsrvpd's parsers with atheris (libFuzzer for Python).

    scripts/fuzz.py TARGET [libFuzzer options]     e.g.  scripts/fuzz.py pdu -max_total_time=600

TARGET is one of tests/fuzz/targets.py's TARGETS (pdu, ndr, auth).  The run starts from the
shipped corpus tests/fuzz/corpus/TARGET plus seeds made from valid messages, and grows its own
corpus in build/fuzz/corpus/TARGET; an input that crashes a target is written to
build/fuzz/crashes/ -- move it into tests/fuzz/regressions/TARGET/ once the bug is fixed, and the
suite replays it from then on.  Only fsrvpd's modules are instrumented.
"""

from __future__ import annotations

import hashlib
import os
import sys

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

with atheris.instrument_imports(include=["fsrvpd"]):
    from tests.fuzz import targets


TARGET_VARIABLE = "FSRVPD_FUZZ_TARGET"


def main() -> None:
    # libFuzzer's -merge, -fork and -jobs re-run argv[0] with libFuzzer's own options only: the
    # target travels in the environment, and PATH makes the shebang find this interpreter again.
    if len(sys.argv) > 1 and sys.argv[1] in targets.TARGETS:
        os.environ[TARGET_VARIABLE] = sys.argv.pop(1)
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    name = os.environ.get(TARGET_VARIABLE)
    if name not in targets.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(targets.TARGETS)}}} [libFuzzer options]")
    corpus = os.path.join(ROOT, "build", "fuzz", "corpus", name)
    crashes = os.path.join(ROOT, "build", "fuzz", "crashes")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    for seed in targets.seeds()[name]:
        with open(os.path.join(corpus, "seed-" + hashlib.sha1(seed).hexdigest()), "wb") as handle:
            handle.write(seed)
    shipped = os.path.join(ROOT, "tests", "fuzz", "corpus", name)
    options = [arg for arg in sys.argv[1:] if arg.startswith("-")]
    corpora = [arg for arg in sys.argv[1:] if not arg.startswith("-")] or [corpus, shipped]
    atheris.Setup([sys.argv[0], f"-artifact_prefix={crashes}/{name}-", *options, *corpora], targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
