"""What the daemon reports about its own work as it happens, for metrics.

The service, the RPC layer and the front doors call these hooks at a few points; this base class
ignores them, `metrics.Metrics` counts them.  Keeping the hooks this narrow keeps the protocol
code free of any metrics library.
"""

from __future__ import annotations


class Observer:
    """No-op hooks; override the ones you count."""

    def call_answered(self, operation: str, result: int, seconds: float) -> None:
        """One FSRVP call answered (`result` is the HRESULT) or faulted (`result` is the fault status)."""

    def timer_expired(self, sets: int) -> None:
        """The Message Sequence Timer fired and removed `sets` shadow copy sets."""

    def caller_refused(self, reason: str) -> None:
        """A caller was turned away before any FSRVP call ("logon", "access_denied")."""

    def swept(self, backend: str, orphans: int, left: int) -> None:
        """A sweep found `orphans` tagged objects no set owns and could not remove `left` of them."""

    def snapshot_failed(self, backend: str) -> None:
        """An exposed snapshot was found broken (an overflowed classic LVM snapshot); its share is withdrawn."""

    def sets_reaped(self, sets: int) -> None:
        """The exposure TTL removed `sets` non-persistent sets their clients never deleted."""

    def repaired(self, repair: str) -> None:
        """Reconciliation repaired one thing: "interrupted_call", "copy_lost", "exposure_remade",
        "share_withdrawn" or "share_published"."""

    def retention_pruned(self, copies: int) -> None:
        """Retention removed `copies` retained copies its policies no longer keep."""
