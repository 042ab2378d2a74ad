"""The LVM pieces that need no device-mapper, run on the host: the share keys in the config, snapshot
sizes, and the demo refusing to start where the kernel has no device-mapper. Everything that
touches LVM itself is in test_lvm.py (inside the VM).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fsrvpd.backends.lvm import LogicalVolume, SnapshotSize
from fsrvpd.config import ConfigError, parse

REPO = Path(__file__).resolve().parents[1]


def share_config(settings: str) -> str:
    return f"shares:\n  vms:\n    path: /srv/vms\n{settings}"


def test_lvm_share_keys_name_the_volume_and_the_snapshot_size():
    config = parse(share_config("    backend: lvm\n    volume: vg0/vms\n    snapshot_size: 10%\n"))
    share = config.share("vms")
    assert (share.backend, share.store, share.snapshot_size) == ("lvm", "vg0/vms", SnapshotSize(percent=10))
    assert parse(share_config("    backend: lvm\n")).share("vms").snapshot_size == SnapshotSize(percent=20)
    assert parse(share_config("    backend: zfs\n")).share("vms").snapshot_size is None


@pytest.mark.parametrize("settings, complaint", [
    ("    backend: lvm\n    volume: vms\n", "<config>:5: shares.vms.volume: 'vms' is not valid: VG/LV"),
    ("    backend: lvm\n    snapshot_size: 0%\n", "<config>:5: shares.vms.snapshot_size: '0%': a share"),
    ("    backend: lvm\n    snapshot_size: lots\n", "<config>:5: shares.vms.snapshot_size: 'lots' is neither"),
    ("    backend: zfs\n    volume: vg0/vms\n", "<config>:5: shares.vms.volume: is not a known setting"),
    ("    backend: lvm\n    dataset: tank/vms\n", "<config>:5: shares.vms.dataset: is not a known setting"),
], ids=["volume-not-vg-lv", "size-zero", "size-garbage", "volume-on-zfs", "dataset-on-lvm"])
def test_bad_lvm_share_keys_are_reported_by_line_and_key(settings, complaint):
    with pytest.raises(ConfigError) as error:
        parse(share_config(settings))
    assert str(error.value).startswith(complaint)


def test_snapshot_sizes_round_up_to_whole_extents():
    origin = LogicalVolume(vg="vg0", name="files", attr="-wi-ao----", origin="", pool="", tags=frozenset(),
                           data_percent=None, size=100 << 20, vg_size=2 << 30, vg_free=1 << 30, extent_size=4 << 20, device="254:1")
    assert SnapshotSize.parse("20%").bytes_for(origin) == 20 << 20
    assert SnapshotSize.parse("10%").bytes_for(origin) == 12 << 20
    assert SnapshotSize.parse("1.5G") == SnapshotSize(size=3 << 29)
    assert SnapshotSize.parse("512MiB").bytes_for(origin) == 512 << 20
    assert SnapshotSize.parse("1").bytes_for(origin) == 4 << 20


@pytest.mark.skipif(os.path.exists("/dev/mapper/control"), reason="this kernel has device-mapper")
def test_lvm_demo_without_device_mapper_stops_before_making_anything(tmp_path):
    demo_dir = tmp_path / "demo"
    proc = subprocess.run(["make", "-s", "demo", "BACKEND=lvm", f"DEMO_DIR={demo_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "device-mapper" in proc.stderr and "python -m tests.support.vm" in proc.stderr
    assert not demo_dir.exists()
