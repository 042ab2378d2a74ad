#!/usr/bin/env python3
"""Soak: N concurrent clients run full backup cycles against one fsrvpd for a bounded time.

    .venv/bin/python bench/soak.py --clients 4 --seconds 600

Each client comes from its own loopback address (tests/support/net.py), as separate backup
servers would, and loops: SetContext (BACKUP or auto-recovery, alternately), StartShadowCopySet,
AddToShadowCopySet for every share, Prepare, Commit, Expose, GetShareMapping, a read of the
snapshot share over SMB (every --read-every cycles), RecoveryComplete, DeleteShareMapping.  Only
one set may be in creation at a time (MS-FSRVP), so the others get SET_IN_PROGRESS from SetContext
and retry after a short random pause: those answers are counted, not errors.

Reported: cycles, SET_IN_PROGRESS answers, errors (anything else), leaked objects (once every
client is done: storage, mounts and shares that disagree with the state, and anything of
fsrvpd's left on the pool), and the daemon's RSS sampled over time.  Exit status 0 only if
errors and leaks are 0 and the RSS stayed flat: the median of the last quarter of the samples
within --rss-growth percent of the median of the second quarter (the first quarter is warm-up).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import rss_kib  # noqa: E402
from fsrvpd.client import FsrvpError  # noqa: E402
from fsrvpd.constants import ATTR_AUTO_RECOVERY, Context, HResult  # noqa: E402
from tests.support.consistency import problems  # noqa: E402
from tests.support.daemon import FsrvpDaemon, ensure_samba_clients, ours_on_storage  # noqa: E402
from tests.support.net import SourceAddressRelay  # noqa: E402
from tests.support.zfs import FilePool, ensure_zfs  # noqa: E402

SHARES = ("vms", "sql")


class Tally:
    """What every client did, shared between their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cycles = 0
        self.in_progress = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def add(self, field: str, value=1) -> None:
        with self.lock:
            if field == "errors":
                self.errors[value] += 1
            else:
                setattr(self, field, getattr(self, field) + value)


def client_loop(daemon: FsrvpDaemon, port: int, number: int, deadline: float, read_every: int, tally: Tally) -> None:
    rng = random.Random(number)
    done = 0
    with daemon.client(port=port) as client:
        while time.monotonic() < deadline:
            context = Context.BACKUP | (ATTR_AUTO_RECOVERY if done % 2 else 0)
            try:
                client.set_context(context)
            except FsrvpError as refused:
                if refused.result != HResult.FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS:
                    tally.add("errors", str(refused))
                else:
                    tally.add("in_progress")
                time.sleep(rng.uniform(0.02, 0.2))
                continue
            try:
                set_id = client.start_shadow_copy_set()
                copies = {share: client.add_to_shadow_copy_set(set_id, share) for share in SHARES}
                client.prepare(set_id)
                client.commit(set_id)
                client.expose(set_id)
                for share, copy_id in copies.items():
                    client.get_share_mapping(set_id, copy_id, share)
                if read_every and done % read_every == 0:
                    listing = daemon.smbclient(f"vms@{{{copies['vms']}}}", "ls")
                    if "NT_STATUS" in listing:
                        tally.add("errors", f"reading the snapshot share: {listing.strip()[-200:]}")
                client.recovery_complete(set_id)
                for share, copy_id in copies.items():
                    client.delete_share_mapping(set_id, copy_id, share)
            except Exception as exc:  # an error in the middle of a cycle: count it, abort, go on
                tally.add("errors", f"{type(exc).__name__}: {exc}")
                try:
                    client.abort(set_id)
                except Exception:
                    pass
                continue
            done += 1
            tally.add("cycles")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--sample-seconds", type=float, default=5, help="RSS sampling interval")
    parser.add_argument("--read-every", type=int, default=5, help="read the snapshot share every N cycles (0: never)")
    parser.add_argument("--rss-growth", type=float, default=10.0, help="allowed RSS growth, percent")
    parser.add_argument("--no-rss-check", action="store_true", help="report the RSS but do not judge it")
    args = parser.parse_args()
    zfs_fuse = ensure_zfs()
    ensure_samba_clients()
    tally, samples, leaks = Tally(), [], ["the run did not finish"]
    try:
        with tempfile.TemporaryDirectory(prefix="fsrvpd-soak-") as directory, FilePool() as pool:
            daemon = FsrvpDaemon(pool, Path(directory), SHARES)
            daemon.config["logging"]["level"] = "info"
            daemon.start()
            try:
                relays = [SourceAddressRelay(f"127.0.0.{10 + number}", ("127.0.0.1", daemon.port))
                          for number in range(args.clients)]
                for relay in relays:
                    relay.__enter__()
                started = time.monotonic()
                deadline = started + args.seconds
                clients = [threading.Thread(target=client_loop, args=(daemon, relay.port, number, deadline,
                                                                       args.read_every, tally))
                           for number, relay in enumerate(relays)]
                for thread in clients:
                    thread.start()
                while any(thread.is_alive() for thread in clients):
                    samples.append((time.monotonic() - started, rss_kib(daemon.process.pid)))
                    print(f"{samples[-1][0]:7.0f} s  RSS {samples[-1][1]:8d} KiB  cycles {tally.cycles:6d}  "
                          f"in progress {tally.in_progress:6d}  errors {sum(tally.errors.values())}", flush=True)
                    time.sleep(args.sample_seconds)
                for thread in clients:
                    thread.join()
                for relay in relays:
                    relay.__exit__(None, None, None)
                leaks = problems(daemon) + [f"left at the end: {name}" for name in ours_on_storage(pool)]
            finally:
                daemon.stop()
    finally:
        if zfs_fuse is not None:
            zfs_fuse.terminate()
    return report(args, tally, samples, leaks)


def report(args, tally: Tally, samples: list[tuple[float, int]], leaks: list[str]) -> int:
    rss = [kib for _, kib in samples]
    quarter = max(1, len(rss) // 4)
    warm, late = statistics.median(rss[quarter:2 * quarter] or rss), statistics.median(rss[-quarter:])
    growth = (late - warm) * 100 / warm
    flat = growth <= args.rss_growth
    print(f"\nclients {args.clients}, {args.seconds:.0f} s: cycles {tally.cycles}, SET_IN_PROGRESS answers "
          f"{tally.in_progress}, errors {sum(tally.errors.values())}, leaked objects {len(leaks)}")
    print(f"RSS: first {rss[0]} KiB, after warm-up {warm:.0f} KiB, last quarter {late:.0f} KiB, max {max(rss)} KiB "
          f"({growth:+.1f}%: {'flat' if flat else 'GROWING'})")
    for error, count in tally.errors.most_common(10):
        print(f"  error x{count}: {error}")
    for leak in leaks[:20]:
        print(f"  leak: {leak}")
    return 0 if not tally.errors and not leaks and (flat or args.no_rss_check) else 1


if __name__ == "__main__":
    sys.exit(main())
