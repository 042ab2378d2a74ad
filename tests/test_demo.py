"""`make demo`'s script, run as a newcomer would: it comes up, the rpcclient line it prints works,
Ctrl-C stops it cleanly, and running it again picks up where it stopped."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.daemon import free_port

pytestmark = [pytest.mark.zfs, pytest.mark.samba_client]

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"
READY = "serving \\\\FSRVPD-DEMO"


class Demo:
    def __init__(self, directory: Path):
        self.env = {**os.environ, "DEMO_DIR": str(directory), "DEMO_POOL": f"fsrvpdemo{uuid.uuid4().hex[:8]}",
                    "DEMO_PORT": str(free_port()), "DEMO_METRICS_PORT": str(free_port()),
                    "FSRVPD": str(Path(sys.executable).parent / "fsrvpd")}
        self.log = directory / "demo.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(["bash", str(DEMO)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 60
        while READY not in self.log.read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)
        return self.log.read_text()

    def ctrl_c(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=30)

    def destroy_pool(self) -> None:
        subprocess.run(["zpool", "destroy", "-f", self.env["DEMO_POOL"]], capture_output=True)


def printed_command(output: str, fss_command: str) -> list[str]:
    """The rpcclient line the demo printed for this command, as argv."""
    line = next(line.strip() for line in output.splitlines() if f"-c '{fss_command}" in line)
    return shlex.split(line)


def test_demo_starts_serves_stops_on_ctrl_c_and_starts_again(zfs_daemon, samba_clients, tmp_path):
    demo = Demo(tmp_path)
    try:
        output = demo.start()
        created = subprocess.run(printed_command(output, "fss_create_expose"), capture_output=True, text=True).stdout
        exposed = re.search(r"share \\\\[^\\]+\\(vms@\{[0-9a-f-]+\}) exposed", created)
        assert exposed, created
        with urllib.request.urlopen(f"http://127.0.0.1:{demo.env['DEMO_METRICS_PORT']}/metrics") as scrape:
            assert b'fsrvpd_calls_total{operation="CommitShadowCopySet",result="S_OK"} 1.0' in scrape.read()
        assert demo.ctrl_c() == 0

        demo.start()
        listing = subprocess.run(["smbclient", "-p", demo.env["DEMO_PORT"], "-U", "backup%backup",
                                  f"//127.0.0.1/{exposed.group(1)}", "-c", "ls"], capture_output=True, text=True)
        assert "disk.vhdx" in listing.stdout, listing.stdout + listing.stderr
        assert demo.ctrl_c() == 0
    finally:
        if demo.process and demo.process.poll() is None:
            demo.ctrl_c()
        demo.destroy_pool()
