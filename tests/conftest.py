"""Fixtures shared by the suite: real zfs-fuse pools and real fsrvpd daemons."""

pytest_plugins = ["tests.support.zfs", "tests.support.daemon", "tests.support.samba"]
