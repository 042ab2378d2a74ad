"""Retention's pure rules: what a policy keeps, what a completed backup is."""

from __future__ import annotations

import dataclasses
import os
import uuid

from fsrvpd.backends.host import sync_symlink_tree
from fsrvpd.constants import ATTR_AUTO_RECOVERY, Context
from fsrvpd.retention import (SECONDS_PER_DAY, RetainedCopy, RetentionPolicy, previous_versions, retained_copy,
                              to_prune)
from fsrvpd.state import ShadowCopy, ShadowCopySet, Status

NOW = 1_000 * SECONDS_PER_DAY
STORE = {"backend": "zfs", "name": "tank/vms", "group": "tank", "mountpoint": "/tank/vms"}


def kept(share: str, days_old: float) -> RetainedCopy:
    return RetainedCopy(copy_id=uuid.uuid4(), set_id=uuid.uuid4(), share=share, store=STORE, context=0,
                        created_at=NOW - days_old * SECONDS_PER_DAY, retained_at=NOW, keeps_exposure=False,
                        exposed_path=None)


def test_keep_last_keeps_the_newest():
    copies = [kept("vms", age) for age in (3, 1, 2, 5)]
    doomed = to_prune(copies, lambda share: RetentionPolicy(keep_last=2), NOW)
    assert sorted(c.created_at for c in doomed) == [NOW - 5 * SECONDS_PER_DAY, NOW - 3 * SECONDS_PER_DAY]


def test_keep_days_keeps_the_young():
    copies = [kept("vms", age) for age in (0.5, 6.9, 7, 30)]
    doomed = to_prune(copies, lambda share: RetentionPolicy(keep_days=7), NOW)
    assert sorted(c.created_at for c in doomed) == [NOW - 30 * SECONDS_PER_DAY, NOW - 7 * SECONDS_PER_DAY]


def test_either_rule_keeps_a_copy():
    copies = [kept("vms", age) for age in (1, 2, 40, 50)]
    doomed = to_prune(copies, lambda share: RetentionPolicy(keep_last=3, keep_days=7), NOW)
    assert [c.created_at for c in doomed] == [NOW - 50 * SECONDS_PER_DAY]


def test_policies_are_per_share_and_a_share_without_one_keeps_everything():
    vms, sql, gone = kept("VMS", 10), kept("sql", 10), kept("old", 10)
    policies = {"vms": RetentionPolicy(keep_days=1), "sql": RetentionPolicy(keep_last=1)}
    assert to_prune([vms, sql, gone], lambda share: policies.get(share.casefold()), NOW) == [vms]


def test_only_completed_backups_are_retained():
    copy = ShadowCopy(copy_id=uuid.uuid4(), client_copy_id=uuid.uuid4(), share="vms", unc="\\\\fs\\vms\\",
                      store=STORE, created_at=NOW - 60, exposed_name="vms@{x}", exposed_path="/mnt/x")

    def a_set(status: Status, context: int) -> ShadowCopySet:
        return ShadowCopySet(set_id=uuid.uuid4(), client_set_id=uuid.uuid4(), context=context, status=status,
                             client_address="10.0.0.1", principal="backup", started_at=NOW - 60)

    policy = RetentionPolicy(keep_last=1)
    assert retained_copy(a_set(Status.EXPOSED, Context.BACKUP | ATTR_AUTO_RECOVERY), copy, policy, NOW) is None
    read_only = retained_copy(a_set(Status.EXPOSED, Context.BACKUP), copy, policy, NOW)
    assert (read_only.created_at, read_only.keeps_exposure) == (NOW - 60, False)
    recovered = retained_copy(a_set(Status.RECOVERED, Context.BACKUP | ATTR_AUTO_RECOVERY), copy, policy, NOW)
    assert recovered.keeps_exposure  # the writers' recovery lives in the exposure
    assert RetainedCopy.from_dict(recovered.to_dict()) == recovered
    shown = retained_copy(a_set(Status.EXPOSED, Context.BACKUP), copy, RetentionPolicy(1, previous_versions=True), NOW)
    assert shown.keeps_exposure and shown.exposed_path == "/mnt/x"  # Previous Versions reads it there


def test_previous_versions_name_exposed_copies_by_their_commit_time_in_utc():
    def copy(share: str, created_at: float, exposed: bool = True) -> RetainedCopy:
        return dataclasses.replace(kept(share, 0), created_at=created_at, keeps_exposure=exposed,
                                   exposed_path=f"/mnt/{created_at}" if exposed else None)

    at = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
    copies = [copy("vms", at), copy("vms", at + 0.5), copy("vms", at + 86400), copy("vms", at + 5, exposed=False),
              copy("sql", at), copy("plain", at)]
    policies = {"vms": RetentionPolicy(keep_last=9, previous_versions=True),
                "sql": RetentionPolicy(keep_last=9, previous_versions=True), "plain": RetentionPolicy(keep_last=9)}
    assert previous_versions(copies, policies.get) == {
        "vms": {"@GMT-2026.11.18-11.06.40": f"/mnt/{at + 0.5}",  # the same second: the later copy shows
                "@GMT-2026.11.19-11.06.40": f"/mnt/{at + 86400}"},
        "sql": {"@GMT-2026.11.18-11.06.40": f"/mnt/{at}"}}


def test_sync_symlink_tree_makes_exactly_the_wanted_links(tmp_path):
    root = str(tmp_path / "pv")
    sync_symlink_tree(root, {"vms": {"@GMT-1": "/a", "@GMT-2": "/b"}, "sql": {"@GMT-1": "/c"}})
    os.mkdir(tmp_path / "pv" / "vms" / "admin's")
    sync_symlink_tree(root, {"vms": {"@GMT-2": "/b2", "@GMT-3": "/d"}})
    assert sorted(os.listdir(root)) == ["vms"]
    links = {entry.name: os.readlink(entry.path) for entry in os.scandir(tmp_path / "pv" / "vms") if entry.is_symlink()}
    assert links == {"@GMT-2": "/b2", "@GMT-3": "/d"}
    assert os.path.isdir(tmp_path / "pv" / "vms" / "admin's")  # not a link: not fsrvpd's to remove
