"""Prometheus metrics on an HTTP endpoint of their own.

Two kinds: what fsrvpd did (calls, latencies, timer expiries, refused callers, sweeps), counted
through the `Observer` hooks as it happens; and what it holds right now (sets, exposed shares,
snapshots, clones, the bytes they pin, pool space, storage command totals), read at scrape time
from the service's state and the storage.  Scrapes are answered by a thread of their own, so a
scrape never waits for the event loop and a slow `zfs get` never delays an FSRVP call.  The
README lists every metric; a test checks that the endpoint serves each one.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from .backends.base import BackendError, FileStore, NotSupported
from .constants import HResult, hresult_name
from .observer import Observer
from .service import copy_ref
from .state import HOLDS_SNAPSHOTS, Status

log = logging.getLogger("fsrvpd.metrics")

# VSS keeps the applications' writes frozen while CommitShadowCopySet runs (writers give up after
# about 10 s; the client's own commit timeout is typically 60 s): resolve that range finely.
REPAIRS = ("interrupted_call", "copy_lost", "exposure_remade", "share_withdrawn", "share_published")
CALL_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)


class Metrics(Observer):
    """The registry, the counters the hooks feed, and the HTTP endpoint."""

    def __init__(self, version: str):
        self.registry = CollectorRegistry()
        self.calls = Counter("fsrvpd_calls", "FSRVP calls answered, by operation and result (HRESULT name or "
                             "fault status)", ["operation", "result"], registry=self.registry)
        self.call_seconds = Histogram("fsrvpd_call_duration_seconds", "Time to answer an FSRVP call, by operation",
                                      ["operation"], buckets=CALL_BUCKETS, registry=self.registry)
        self.timer_expiries = Counter("fsrvpd_sequence_timer_expiries", "Times the Message Sequence Timer fired "
                                      "and removed unfinished sets", registry=self.registry)
        self.refused = Counter("fsrvpd_refused_callers", "Callers turned away (failed logon, access denied)",
                               ["reason"], registry=self.registry)
        self.orphans_removed = Counter("fsrvpd_orphans_removed", "Tagged storage objects no set owned, removed by "
                                       "a sweep", ["backend"], registry=self.registry)
        self.orphans = Gauge("fsrvpd_orphans", "Tagged storage objects no set owns that the last sweep could not "
                             "remove", ["backend"], registry=self.registry)
        self.broken_snapshots = Counter("fsrvpd_broken_snapshots", "Exposed snapshots found broken (an overflowed "
                                        "classic LVM snapshot) and withdrawn, by backend", ["backend"],
                                        registry=self.registry)
        self.reloads = Counter("fsrvpd_config_reloads", "Configuration reloads (SIGHUP), by result", ["result"],
                               registry=self.registry)
        self.reaped = Counter("fsrvpd_exposure_ttl_reaped_sets", "Non-persistent sets removed by the exposure TTL "
                              "(their clients never deleted them)", registry=self.registry)
        self.repairs = Counter("fsrvpd_repairs", "Repairs by reconciliation, by kind", ["repair"],
                               registry=self.registry)
        self.pruned = Counter("fsrvpd_retained_pruned", "Retained copies removed because their share's retention "
                              "policy no longer keeps them", registry=self.registry)
        for repair in REPAIRS:
            self.repairs.labels(repair)
        Gauge("fsrvpd_build_info", "Always 1; the version label says which fsrvpd runs", ["version"],
              registry=self.registry).labels(version).set(1)
        ProcessCollector(registry=self.registry)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        for reason in ("logon", "access_denied"):
            self.refused.labels(reason)
        for backend in ("zfs", "lvm"):
            self.broken_snapshots.labels(backend)
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- hooks --------------------------------------------------------------------------------
    def call_answered(self, operation: str, result: int, seconds: float) -> None:
        self.calls.labels(operation, hresult_name(result)).inc()
        self.call_seconds.labels(operation).observe(seconds)
        if result == HResult.E_ACCESSDENIED:
            self.caller_refused("access_denied")

    def timer_expired(self, sets: int) -> None:
        self.timer_expiries.inc()

    def caller_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def swept(self, backend: str, orphans: int, left: int) -> None:
        self.orphans_removed.labels(backend).inc(orphans - left)
        self.orphans.labels(backend).set(left)

    def snapshot_failed(self, backend: str) -> None:
        self.broken_snapshots.labels(backend).inc()

    def sets_reaped(self, sets: int) -> None:
        self.reaped.inc(sets)

    def repaired(self, repair: str) -> None:
        self.repairs.labels(repair).inc()

    def retention_pruned(self, copies: int) -> None:
        self.pruned.inc(copies)

    def config_reloaded(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    # -- state and endpoint -------------------------------------------------------------------
    def watch(self, service, runner) -> None:
        """Read the service's state and the runner's command totals at every scrape."""
        self.registry.register(_HeldCollector(service, runner))

    def serve(self, address: str, port: int) -> None:
        """Answer GET /metrics (any path, as prometheus_client does) on address:port in a thread."""
        server_class = http.server.ThreadingHTTPServer
        if ":" in address:
            server_class = type("ThreadingHTTPServer6", (http.server.ThreadingHTTPServer,),
                                {"address_family": socket.AF_INET6})
        self._server = server_class((address, port), _QuietHandler.factory(self.registry))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fsrvpd-metrics", daemon=True).start()
        log.info("metrics on http://%s:%d/metrics", address if ":" not in address else f"[{address}]", port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietHandler(MetricsHandler):
    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        """Scrapes every few seconds would drown the log; errors still reach log_error."""


class _HeldCollector:
    """What fsrvpd holds, computed afresh for each scrape (in the scrape's thread)."""

    def __init__(self, service, runner):
        self.service = service
        self.runner = runner

    def describe(self):
        return []  # computed per scrape; nothing to check at registration

    def collect(self):
        yield from self._sets()
        yield from self._shares()
        yield from self._storage_commands()

    def _sets(self):
        sets = list(self.service.machine.sets.values())
        by_status = GaugeMetricFamily("fsrvpd_shadow_copy_sets", "Shadow copy sets in the state, by status",
                                      labels=["status"])
        oldest = GaugeMetricFamily("fsrvpd_shadow_copy_set_oldest_age_seconds",
                                   "Age of the oldest set in each status (only statuses that have sets)",
                                   labels=["status"])
        now = time.time()
        for status in Status:
            members = [scs for scs in sets if scs.status is status]
            by_status.add_metric([status.value], len(members))
            if members:
                oldest.add_metric([status.value], now - min(scs.started_at for scs in members))
        yield by_status
        yield oldest

    def _shares(self):
        config = self.service.config
        names = {share.name: share for share in config.shares.values()}
        held = {kind: GaugeMetricFamily(f"fsrvpd_{kind}", text, labels=["share"]) for kind, text in (
            ("exposed_shares", "Shadow copy shares share@{GUID} published, by base share"),
            ("snapshots", "Snapshots fsrvpd holds, by share"),
            ("clones", "Clones (exposed shadow copies) fsrvpd holds, by share"))}
        pinned = GaugeMetricFamily("fsrvpd_pinned_bytes", "Bytes the held snapshots and clones pin "
                                   "(ZFS `used`), by share and kind", labels=["share", "kind"])
        counts = {name: {kind: 0 for kind in held} for name in names}
        space: dict[tuple[str, str], int] = {}
        for scs in list(self.service.machine.sets.values()):
            for copy in list(scs.copies):
                count = counts.setdefault(copy.share, {kind: 0 for kind in held})
                count["exposed_shares"] += copy.exposed_name is not None and copy.exposed_path is not None
                count["snapshots"] += scs.status in HOLDS_SNAPSHOTS and copy.source is None
                count["clones"] += copy.exposed_path is not None
                for kind, size in self._usage(scs, copy).items():
                    space[(copy.share, kind)] = space.get((copy.share, kind), 0) + size
        for share, count in counts.items():
            for kind, value in count.items():
                held[kind].add_metric([share], value)
        for (share, kind), size in space.items():
            pinned.add_metric([share, kind], size)
        retained = GaugeMetricFamily("fsrvpd_retained_copies", "Copies kept by retention after DeleteShareMapping, "
                                     "by share", labels=["share"])
        for name in names:
            retained.add_metric([name], sum(copy.share == name for copy in list(self.service.retained.values())))
        yield retained
        yield GaugeMetricFamily("fsrvpd_copies_being_removed", "Deleted copies whose storage is not removed yet "
                                "(removal runs after DeleteShareMapping is answered)", value=len(self.service.removing))
        yield GaugeMetricFamily("fsrvpd_shares", "Base shares configured", value=len(names))
        yield from held.values()
        yield pinned
        yield from self._pools(names.values())

    def _usage(self, scs, copy) -> dict[str, int]:
        try:
            return self.service.backends[copy.store["backend"]].usage(copy_ref(scs, copy))
        except BackendError as exc:
            log.debug("no usage for copy %s: %s", copy.copy_id, exc)
            return {}

    def _pools(self, shares):
        used = GaugeMetricFamily("fsrvpd_pool_used_bytes", "Bytes used in the pool (volume group) of the "
                                 "configured shares", labels=["backend", "pool"])
        available = GaugeMetricFamily("fsrvpd_pool_available_bytes", "Bytes available in the pool (volume "
                                      "group) of the configured shares", labels=["backend", "pool"])
        stores: dict[tuple[str, str], FileStore] = {}
        for share in shares:
            backend = self.service.backends[share.backend]
            try:
                store = backend.file_store(share.path, share.store)
            except (BackendError, NotSupported) as exc:
                log.debug("no pool space for share %s: %s", share.name, exc)
                continue
            stores[(store.backend, store.group)] = store
        for (backend_name, group), store in stores.items():
            try:
                space = self.service.backends[backend_name].pool_space(store)
            except BackendError as exc:
                log.debug("no space of pool %s: %s", group, exc)
                continue
            if space:
                used.add_metric([backend_name, group], space["used"])
                available.add_metric([backend_name, group], space["available"])
        yield used
        yield available

    def _storage_commands(self):
        calls = CounterMetricFamily("fsrvpd_storage_commands", "Storage commands run (zfs, lvm, ...), by command",
                                    labels=["command"])
        failures = CounterMetricFamily("fsrvpd_storage_command_failures", "Storage commands that failed or timed "
                                       "out, by command", labels=["command"])
        seconds = CounterMetricFamily("fsrvpd_storage_command_seconds", "Time spent in storage commands, by "
                                      "command", labels=["command"])
        for command, stats in sorted(self.runner.totals().items()):
            calls.add_metric([command], stats.calls)
            failures.add_metric([command], stats.failures)
            seconds.add_metric([command], stats.seconds)
        yield calls
        yield failures
        yield seconds
