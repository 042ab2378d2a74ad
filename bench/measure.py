"""The one client every server is measured with: our FSRVP client, timing each call it makes.

A backup cycle is what a Windows requester does for one shadow copy set: SetContext, Start, one
Add per share, Prepare, Commit, Expose, one GetShareMapping per share, RecoveryComplete and one
DeleteShareMapping per share. Before each cycle the requester's queries (GetSupportedVersion,
IsPathSupported and IsPathShadowCopied of the first share) are timed too, outside the cycle time.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from typing import Any

from fsrvpd import messages as m
from fsrvpd.client import FsrvpClient, FsrvpError, RpcFault

# Operation names as the report shows them, in the order of a cycle.
OPERATIONS = ("GetSupportedVersion", "IsPathSupported", "IsPathShadowCopied", "SetContext", "StartShadowCopySet",
              "AddToShadowCopySet", "PrepareShadowCopySet", "CommitShadowCopySet", "ExposeShadowCopySet",
              "GetShareMapping", "RecoveryCompleteShadowCopySet", "DeleteShareMapping")
CYCLE = "full cycle"
SETTLED = "storage removed, after the last answer"  # bench storage.settle
FLOOR_AFTER = "the snapshots alone, right after the cycle"  # bench storage.floor's "commit", in this server's turn


class TimedClient(FsrvpClient):
    """FsrvpClient that records how long each call took, per operation, into `samples`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.samples: dict[str, list[float]] = collections.defaultdict(list)
        self.refused: set[str] = set()  # operations the server answered with an error

    def call(self, request: Any) -> Any:
        started = time.perf_counter()
        response = super().call(request)
        operation = type(request).__name__.removesuffix("Request")
        self.samples[operation].append(time.perf_counter() - started)
        if response.result != 0:
            self.refused.add(operation)
        return response

    def backup_cycle_timed(self, shares: list[str]) -> float:
        """One whole cycle over `shares`, leaving nothing behind; returns its duration in seconds."""
        self.call(m.GetSupportedVersionRequest())
        self.call(m.IsPathSupportedRequest(self.unc(shares[0])))
        self.call(m.IsPathShadowCopiedRequest(self.unc(shares[0])))  # Samba does not implement it
        started = time.perf_counter()
        mappings = self.backup_cycle(shares)  # SetContext .. Expose, then GetShareMapping of each share
        set_id = mappings[0].set_id
        try:
            self.recovery_complete(set_id)
            for mapping, share in zip(mappings, shares):
                self.delete_share_mapping(set_id, mapping.copy_id, share)
        except (FsrvpError, RpcFault):
            self._abort_quietly(set_id)
            raise
        elapsed = time.perf_counter() - started
        self.samples[CYCLE].append(elapsed)
        return elapsed

    def exposed_set(self, share: str) -> None:
        """A set left exposed and recovered (read-only): what a daemon holds between backups."""
        self.recovery_complete(self.backup_cycle([share])[0].set_id)


def cycle_with_retries(client: TimedClient, shares: list[str], attempts: int = 3) -> list[str]:
    """One cycle; a failed one is thrown away (its samples too) and run again. Returns the failures."""
    failures = []
    for attempt in range(attempts):
        kept = {operation: len(samples) for operation, samples in client.samples.items()}
        try:
            client.backup_cycle_timed(shares)
            return failures
        except (FsrvpError, RpcFault) as exc:
            failures.append(str(exc))
            for operation, samples in client.samples.items():
                del samples[kept.get(operation, 0):]
            if attempt == attempts - 1:
                raise
    return failures


def percentile(samples: list[float], fraction: float) -> float:
    """Nearest-rank percentile (with few samples, p99 is the slowest one)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def summary(samples: list[float]) -> dict[str, float]:
    """p50, p99 and mean in milliseconds, and the sample count."""
    return {"p50_ms": percentile(samples, 0.50) * 1000, "p99_ms": percentile(samples, 0.99) * 1000,
            "mean_ms": statistics.fmean(samples) * 1000, "n": len(samples)}


def rss_kib(pid: int) -> int:
    """A process's resident set size in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
