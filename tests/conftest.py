"""Fixtures shared by the suite: real zfs-fuse pools, LVM in a VM and real fsrvpd daemons."""

pytest_plugins = ["tests.support.zfs", "tests.support.daemon", "tests.support.lvm", "tests.support.vm"]
