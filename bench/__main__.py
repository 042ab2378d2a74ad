"""`make bench`: fsrvpd against Samba's own FSRVP server, on the same storage, with the same client.

Phases, on one file-backed zfs-fuse pool and one loop-mounted btrfs (bench/storage.py):
  1. backup cycles of 1, 8 and 64 shares against every server on each backend (bench/servers.py:
     fsrvpd in each front-door mode -- on btrfs once fsrvpd has that backend -- and Samba's
     rpcd_fsrvp), one client connection per server, one warm-up cycle, then N measured cycles;
     after each cycle the bench waits until the cycle's snapshots and clones are gone (both
     servers destroy them after answering DeleteShareMapping; on btrfs until the kernel has
     dropped the deleted subvolumes) and reports that wait too;
     the servers run one after another (two fsrvpd instances on one pool would each take the
     other's snapshots for its own orphans); the raw floor of each set (the snapshots alone, and
     every storage command of a cycle, straight through the storage's command line) takes a turn
     after each measured cycle of every server, so that each server's Commit can be set against
     what the storage did in the same minutes (a shared machine's disk is not steady);
  2. 10,000 snapshots are added on each backend (100 per `zfs snapshot -r`; btrfs by ioctl), then
     the 8-share cycles and floors again;
  3. fsrvpd's resident memory (embedded front door) with 0 and with 1,000 exposed, recovered sets.
Then it prints one table with the ratios and the targets of issue 9 and writes
bench/results/latest.{json,md,png}. Everything it starts -- fsrvpd, smbd, samba-dcerpcd and its
rpcd_* helpers, py-spy -- is stopped, and its pool, file system, mounts and loop device removed,
however it ends (SIGTERM and SIGINT included).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from bench import report
from bench.measure import FLOOR_AFTER, SETTLED, TimedClient, cycle_with_retries, rss_kib, summary
from bench.servers import FSRVPD_FRONT_DOORS, REFERENCE, SERVER_NAME, SERVERS, Endpoint, serves
from bench.storage import BACKENDS, SET_SIZES, BenchStorage
from fsrvpd import __version__

RESULTS = Path(__file__).with_name("results")
SCRATCH = "/var/tmp/fsrvpd-bench"  # pool and file system images, logs: away from /tmp, which others clean
MANY_SNAPSHOTS_SET = 8  # the set size of phase 2
SHARE_TOOLS_SAMPLES = 5  # behind smbd: Samba's tools for one share, timed after each set size
RSS_SERVER = "fsrvpd-embedded"  # the daemon's own memory: behind smbd, the shares live in smbd
LOADS: list[str] = []  # the load average at each log line: how busy others kept the machine


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def log(message: str) -> None:
    LOADS.append(f"{time.strftime('%H:%M:%S')} {load()}")
    print(f"[{time.strftime('%H:%M:%S')}] {message} (load {load()})", flush=True)


def connect(endpoint: Endpoint) -> TimedClient:
    """One connection per server for all its cycles (FsrvpClient connects on entering `with`)."""
    return TimedClient("127.0.0.1", endpoint.port, endpoint.user, endpoint.password, server_name=SERVER_NAME,
                       timeout=600)


@contextlib.contextmanager
def profiled(pid: int | None, output: Path | None) -> Iterator[None]:
    """py-spy samples fsrvpd while the block runs and writes a flame graph (SVG) to `output`."""
    if output is None or pid is None:
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--threads",
                            "--nonblocking", "--output", str(output)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def cycles_phase(storage: BenchStorage, workdir: Path, backend: str, sizes: tuple[int, ...],
                 repetitions: dict[int, int], results: dict, profile: Path | None = None) -> tuple[dict, dict]:
    """Every server on `backend`, one after another: cycles of every set size. Returns the summaries
    per server, size and operation, and those of the floors per size and part (storage.floor)."""
    measured: dict = {}
    floors: dict[str, list[dict[str, float]]] = {}
    share_tools: dict[str, list[dict[str, float]]] = {}
    servers = [server for server in SERVERS if serves(server, backend)]
    for server in servers:
        directory = Path(tempfile.mkdtemp(prefix=f"{server}-{backend}-", dir=workdir))
        with SERVERS[server](storage, backend, storage.all_shares(backend), directory) as endpoint, \
                connect(endpoint) as client, \
                profiled(endpoint.daemon_pid(), profile and profile / f"{server}-{backend}-{'-'.join(map(str, sizes))}.svg"):
            for size in sizes:
                log(f"{backend}, {server}, {size} share(s): 1 + {repetitions[size]} cycles")
                shares = list(storage.shares(backend, size))
                failures: list[str] = []
                for turn in range(1 + repetitions[size]):  # the first turn warms up
                    failures += cycle_with_retries(client, shares)
                    client.samples[SETTLED].append(storage.settle(backend, size))
                    if turn == 0:
                        client.samples.clear()
                        continue
                    floor = storage.floor(backend, size)
                    client.samples[FLOOR_AFTER].append(floor["commit"])
                    floors.setdefault(str(size), []).append(floor)
                measured.setdefault(server, {})[str(size)] = {
                    operation: summary(values) for operation, values in client.samples.items() if values}
                client.samples.clear()
                if endpoint.share_tools is not None:
                    share_tools.setdefault(server, []).extend(endpoint.share_tools(shares[0])
                                                              for _ in range(SHARE_TOOLS_SAMPLES))
                if failures:
                    results["notes"].append(f"{server} on {backend}, {size} share(s): {len(failures)} cycle(s) failed "
                                            f"and were run again; the first: {failures[0]}")
                    log(f"  {server}: {len(failures)} failed cycle(s), e.g. {failures[0]}")
            if client.refused:
                results["refused"].setdefault(backend, {})[server] = sorted(client.refused)
        leftovers = storage.leftovers(backend)
        if leftovers:
            results["notes"].append(f"{server} on {backend} left {len(leftovers)} object(s) behind (removed before "
                                    f"the next server), e.g. {leftovers[0]}")
            log(f"  {server} left behind {len(leftovers)} object(s)")
    for server, samples in share_tools.items():
        measured[server]["share tools"] = {part: summary([sample[part] for sample in samples]) for part in samples[0]}
    return measured, {size: {part: summary([sample[part] for sample in samples]) for part in samples[0]}
                      for size, samples in floors.items()}


def rss_phase(storage: BenchStorage, workdir: Path, sets: int) -> dict:
    """fsrvpd holding `sets` exposed, recovered sets of one share (btrfs when fsrvpd has it: cheaper).
    The last phase: what the sets hold on storage goes with the storage."""
    backend = "btrfs" if serves(RSS_SERVER, "btrfs") else "zfs"
    share, path = next(iter(storage.shares(backend, 1).items()))
    kib = {}
    with FSRVPD_FRONT_DOORS[RSS_SERVER](storage, backend, {share: path},
                                        Path(tempfile.mkdtemp(prefix="rss-", dir=workdir))) as endpoint, \
            connect(endpoint) as client:
        client.backup_cycle_timed([share])  # everything a cycle loads is loaded
        kib["0"] = rss_kib(endpoint.daemon_pid())
        started = time.perf_counter()
        for done in range(1, sets + 1):
            client.exposed_set(share)
            if done % 250 == 0:
                log(f"  {done} exposed sets, RSS {rss_kib(endpoint.daemon_pid()) / 1024:.1f} MiB")
        seconds = time.perf_counter() - started
        kib[str(sets)] = rss_kib(endpoint.daemon_pid())
    return {"backend": backend, "server": RSS_SERVER, "sets": sets, "kib": kib, "seconds_to_expose": seconds}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    os_name = next((line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release")
                    if line.startswith("PRETTY_NAME")), platform.system())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 1024 / 1024, 1), "os": os_name,
            "kernel": platform.release(), "hostname": platform.node()}


def versions() -> dict:
    def package(name: str) -> str:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True).stdout

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"fsrvpd": f"{__version__} ({commit})", "python": platform.python_version(),
            "impacket": metadata.version("impacket"), "samba": package("samba"), "zfs-fuse": package("zfs-fuse"),
            "btrfs-progs": package("btrfs-progs")}


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` stops what it started and removes the storage."""
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, nargs=3, default=[20, 10, 3], metavar=("N1", "N8", "N64"),
                        help="measured cycles per set size (after one warm-up cycle)")
    parser.add_argument("--snapshots", type=int, default=10_000, help="pre-existing snapshots of phase 2")
    parser.add_argument("--exposed-sets", type=int, default=1_000, help="exposed sets of phase 3")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3/2/1 cycles, 500 snapshots, 50 sets")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each fsrvpd with py-spy during its cycles: one flame graph per server and phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.repetitions, args.snapshots, args.exposed_sets = [3, 2, 1], 500, 50
    repetitions = dict(zip(SET_SIZES, args.repetitions))
    _stop_on_sigterm()

    results: dict = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["make bench", *([f"BENCH_ARGS='{' '.join(sys.argv[1:])}'"] if sys.argv[1:] else [])]),
        "machine": machine(), "versions": versions(), "load_before": load(),
        "set_sizes": list(SET_SIZES), "repetitions": repetitions, "warm_up_cycles": 1,
        "servers": {backend: [server for server in SERVERS if serves(server, backend)] for backend in BACKENDS},
        "fsrvpd_servers": list(FSRVPD_FRONT_DOORS), "reference_server": REFERENCE,
        "rpc_auth": "every server: NTLM bind at packet privacy (fsrvpd's rpc.min_auth_level: integrity)",
        "limits": "fsrvpd: limits.max_calls_per_second lifted (Samba has no such limit)",
        "floor": {}, "cycles": {}, "many_snapshots": {}, "refused": {}, "notes": [],
    }
    started = time.monotonic()
    os.makedirs(SCRATCH, exist_ok=True)
    tempfile.tempdir = SCRATCH
    workdir = Path(tempfile.mkdtemp(prefix="run-"))  # daemon and smbd logs; kept if the run fails
    with BenchStorage() as storage:
        for backend in BACKENDS:
            log(f"phase 1, {backend}: backup cycles and the raw floor")
            results["cycles"][backend], results["floor"][backend] = cycles_phase(
                storage, workdir, backend, SET_SIZES, repetitions, results, profile=args.profile)
        for backend in BACKENDS:
            seconds = storage.add_snapshots(backend, args.snapshots)
            count = storage.snapshot_count(backend)
            log(f"phase 2, {backend}: {count} snapshots made in {seconds:.0f} s")
            many, floors = cycles_phase(storage, workdir, backend, (MANY_SNAPSHOTS_SET,), repetitions, results,
                                        profile=args.profile)
            results["many_snapshots"][backend] = {"snapshots": count, "shares": MANY_SNAPSHOTS_SET,
                                                  "seconds_to_make": round(seconds, 1), "cycles": many,
                                                  "floor": floors}
        log(f"phase 3: fsrvpd RSS with 0 and {args.exposed_sets} exposed sets")
        results["rss"] = rss_phase(storage, workdir, args.exposed_sets)
    shutil.rmtree(workdir)
    results["load_after"] = load()
    results["load_during"] = LOADS
    results["seconds"] = round(time.monotonic() - started)
    paths = report.write(results, args.output)
    print()
    print(report.text_table(report.table_rows(results)))
    print()
    print(report.targets_text(results["targets"]))
    print(f"\n{results['seconds']} s; written: {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
