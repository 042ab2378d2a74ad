#!/usr/bin/env python3
"""The long kill matrix: every crash point, many times, plus SIGKILLs at random moments.

    .venv/bin/python bench/kill_matrix.py --rounds 5 --random 50

Each round runs every case of tests/support/crash.py's KILL_CASES on a fresh zfs-fuse pool (the
suite runs each once): the daemon kills itself at the crash point, is restarted, and its state
must agree with storage, mounts and shares; the set is finished as its client would and a full
cycle must succeed.  Then `--random` times, a daemon under a client running full cycles is killed
from outside after a random delay, which also lands between the crash points.  Prints one line
per run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.consistency import problems  # noqa: E402
from tests.support.crash import COMMITTED_TEXT, KILL_CASES, finish, full_cycle, run_kill_case, write  # noqa: E402
from tests.support.daemon import FsrvpDaemon, ensure_samba_clients  # noqa: E402
from tests.support.zfs import FilePool, ensure_zfs  # noqa: E402


def random_kill(daemon: FsrvpDaemon, rng: random.Random, max_delay: float) -> None:
    """Kill the daemon while a client runs cycles, restart it, check it, finish its set, run a cycle."""
    write(os.path.join(daemon.paths["vms"], "f"), COMMITTED_TEXT)
    daemon.start()
    stop = threading.Event()

    def cycles():
        try:
            with daemon.client() as client:
                while not stop.is_set():
                    full_cycle(client)
        except Exception:  # the daemon died under the call
            pass

    worker = threading.Thread(target=cycles)
    worker.start()
    time.sleep(rng.uniform(0.2, max_delay))
    daemon.stop(signal.SIGKILL)
    stop.set()
    worker.join()
    daemon.start()
    found = problems(daemon)
    assert found == [], found
    with daemon.client() as client:
        for scs in daemon.state()[0]:
            finish(daemon, client, scs)
        full_cycle(client)
    assert problems(daemon) == []


def run(name: str, action, results: list[tuple[str, bool, float]]) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fsrvpd-kill-") as directory, FilePool() as pool:
        daemon = FsrvpDaemon(pool, Path(directory))
        try:
            action(daemon)
            ok = True
        except Exception:
            ok = False
            print(traceback.format_exc(), daemon.log()[-5000:], sep="\n", file=sys.stderr)
        finally:
            daemon.stop(signal.SIGKILL)
    elapsed = time.monotonic() - started
    results.append((name, ok, elapsed))
    print(f"{'ok  ' if ok else 'FAIL'} {name} ({elapsed:.1f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="times to run every crash point (default 3)")
    parser.add_argument("--random", type=int, default=20, help="kills at random moments (default 20)")
    parser.add_argument("--max-delay", type=float, default=3.0, help="longest wait before a random kill, s")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"seed {seed}")
    zfs_fuse = ensure_zfs()
    ensure_samba_clients()
    results: list[tuple[str, bool, float]] = []
    try:
        for round_number in range(1, args.rounds + 1):
            for case in KILL_CASES:
                run(f"round {round_number} {case.name}", lambda daemon, case=case: run_kill_case(daemon, case), results)
        for number in range(1, args.random + 1):
            run(f"random kill {number}", lambda daemon: random_kill(daemon, rng, args.max_delay), results)
    finally:
        if zfs_fuse is not None:
            zfs_fuse.terminate()
    failed = [name for name, ok, _ in results if not ok]
    total = sum(elapsed for _, _, elapsed in results)
    print(f"\n{len(results)} runs, {len(failed)} failed, {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
