"""Fixtures shared by the suite: real zfs-fuse pools, loop-mounted btrfs, LVM in a VM and real fsrvpd daemons."""

import pytest

pytest_plugins = ["tests.support.zfs", "tests.support.daemon", "tests.support.samba", "tests.support.lvm",
                  "tests.support.vm", "tests.support.btrfs"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell a failed test (and show logs)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
