"""Fuzzing in the suite: the shipped corpus (the inputs that reached new code in the long runs,
minimised with libFuzzer's -merge) and every input that ever crashed a target are replayed, and
each target gets a short coverage-guided run with atheris (the long run is scripts/fuzz.sh).  Then a real daemon
takes malformed PDUs on many pipes while another client runs a backup: it must stay up, keep its
memory, and serve the other client.  See tests/fuzz/targets.py for what each target checks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.fuzz import targets
from tests.support.daemon import RawPipe, ours_on_storage

ROOT = Path(__file__).resolve().parent.parent
FUZZ = Path(__file__).resolve().parent / "fuzz"
SHORT_RUN_SECONDS = 15


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_shipped_corpus_is_handled(target):
    inputs = sorted((FUZZ / "corpus" / target).iterdir())
    assert inputs, f"tests/fuzz/corpus/{target} is empty"
    for path in inputs:
        targets.TARGETS[target](path.read_bytes())


def test_every_input_that_once_crashed_is_handled():
    """tests/fuzz/regressions/<target>/<input>; none so far -- see tests/fuzz/regressions/README.md."""
    for path in sorted((FUZZ / "regressions").glob("*/*")):
        targets.TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_seeds_are_valid_inputs(target):
    for seed in targets.seeds()[target]:
        targets.TARGETS[target](seed)


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_short_coverage_guided_run_finds_no_crash(target, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), target,
                           f"-max_total_time={SHORT_RUN_SECONDS}", "-timeout=10", "-rss_limit_mb=1024", str(corpus),
                           str(FUZZ / "corpus" / target)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=SHORT_RUN_SECONDS * 10)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done" in proc.stderr


# -- a real daemon under malformed PDUs ---------------------------------------------------------

BIND, NTLM_BIND = targets.RPCCLIENT_BIND, targets.ntlm_bind()
# (bytes, whether the daemon answers them before giving up on the pipe)
MALFORMED = [
    (os.urandom(3000), True),  # bind_nak
    (NTLM_BIND[:-20] + b"\xff" * 20, True),  # a mangled NTLMSSP token: bind_nak
    (BIND + b"\x05\x00\x00\x03\x10\x00\x00\x00\x18\x00\x00\x00" + os.urandom(12), True),  # bind_ack, fault
    (BIND[:40], False),  # half a bind, never finished
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.zfs
def test_malformed_pdus_neither_kill_nor_bloat_nor_block_the_daemon(daemon):
    stalled = RawPipe(daemon.port)
    stalled.write(b"\x05\x00\x0b\x03\x10\x00\x00\x00\xff\xff\x00\x00\x01\x00\x00\x00")  # 64 KiB promised, never sent

    def hammer(rounds: int) -> None:
        for index in range(rounds):
            data, answered = MALFORMED[index % len(MALFORMED)]
            pipe = RawPipe(daemon.port)
            pipe.write(data)
            if answered:
                assert pipe.answers(limit=1), data
            pipe.smb.close()

    hammer(40)  # warm up the allocator before measuring
    before = rss_kib(daemon.process.pid)
    attackers = [threading.Thread(target=hammer, args=(100,)) for _ in range(2)]
    for attacker in attackers:
        attacker.start()
    with daemon.client() as client:  # a backup goes through while the attack runs
        mapping, = client.backup_cycle(["vms"])
        client.delete_share_mapping(mapping.set_id, mapping.copy_id, "vms")
    for attacker in attackers:
        attacker.join()
    grown = rss_kib(daemon.process.pid) - before
    assert daemon.alive()
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 200 malformed connections"
    with daemon.client() as client:
        assert client.get_supported_version() == (1, 1)
    stalled.smb.close()
    assert ours_on_storage(daemon.pool) == []
