"""`make demo BACKEND=lvm` inside the VM: it serves `vms` from a thin pool and removes all of it on
Ctrl-C. A module of its own, so that no other fsrvpd runs meanwhile: an fsrvpd removes every
tagged snapshot that its own state does not know (its orphan sweep), the demo's included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fsrvpd.backends.host import is_below, read_mounts
from tests.support.lvm import run
from tests.test_e2e_rpcclient import EXPOSED

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[1]


def demo_peer(tool: str, *args: str) -> str:
    proc = subprocess.run([tool, "-p", "1445", "-U", "backup%backup", *args], capture_output=True, text=True,
                          timeout=120)
    return proc.stdout + proc.stderr


def test_lvm_demo_serves_vms_and_removes_everything_on_ctrl_c(tmp_path, samba_clients):
    demo_dir = tmp_path / "demo"
    with open(tmp_path / "demo.log", "wb") as log:
        demo = subprocess.Popen(["make", "-s", "demo", "BACKEND=lvm", f"DEMO_DIR={demo_dir}"], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(240):
            if "Share" in demo_peer("smbclient", "-L", "127.0.0.1") or demo.poll() is not None:
                break
            time.sleep(1)
        created = demo_peer("rpcclient", "ncacn_np:127.0.0.1[seal]", "-c", "fss_create_expose backup ro vms")
        exposed = EXPOSED.findall(created)
        assert len(exposed) == 1, created + (tmp_path / "demo.log").read_text()
        [(_, copy_id, _, _)] = exposed
        old = demo_peer("smbclient", f"//127.0.0.1/vms@{{{copy_id}}}", "-c", "get disk.vhdx -")
        assert "demo virtual disk, version 1" in old, (tmp_path / "demo.log").read_text()
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=120)
    for _ in range(120):
        if subprocess.run(["vgs", "fsrvpdemo"], capture_output=True).returncode != 0:
            break
        time.sleep(1)
    assert "removing the LVM demo" in (tmp_path / "demo.log").read_text()
    assert subprocess.run(["vgs", "fsrvpdemo"], capture_output=True).returncode != 0
    assert [m for m in read_mounts() if is_below(m.mountpoint, str(demo_dir))] == []
    assert run("losetup", "-j", str(demo_dir / "lvm.img")) == ""
