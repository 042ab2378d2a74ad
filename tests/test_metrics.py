"""The metrics endpoint of a real daemon after a real backup cycle on a zfs-fuse pool: every metric
the README documents is served, the numbers match what happened, the names pass `promtool check
metrics` (Prometheus' own naming lint), and the shipped alert rules and Grafana dashboard use only
metrics that exist and pass `promtool check rules` / `promtool test rules`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fsrvpd import messages as m
from tests.support.daemon import FsrvpDaemon, free_port

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "packaging/prometheus/fsrvpd-alerts.yml"
DASHBOARD = REPO / "packaging/grafana/fsrvpd-dashboard.json"


def documented_metrics() -> set[str]:
    """The names in the README's metrics table (`| `fsrvpd_...` | type | ... |`)."""
    return set(re.findall(r"^\| `((?:fsrvpd|process)_\w+)` \|", (REPO / "README.md").read_text(), re.M))


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        return answer.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus' promtool, from Debian's prometheus package (installed once if missing)."""
    if shutil.which("promtool") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], check=True,
                       env=env)
    return shutil.which("promtool")


@pytest.mark.zfs
def test_endpoint_serves_every_documented_metric_after_a_real_cycle(zfs_pool, tmp_path, samba_clients, promtool):
    daemon = FsrvpDaemon(zfs_pool, tmp_path)
    daemon.config["metrics"] = {"listen": "127.0.0.1", "port": free_port()}
    daemon.start()
    try:
        with open(os.path.join(daemon.paths["vms"], "disk.vhdx"), "wb") as disk:
            disk.write(os.urandom(2 * 1024 * 1024))
            os.fsync(disk.fileno())
        with daemon.client() as client:
            set_id = client.backup_cycle(["vms", "sql"])[0].set_id
            assert client.call(m.PrepareShadowCopySetRequest(set_id, 1000)).result != 0  # BAD_STATE, counted
        os.remove(os.path.join(daemon.paths["vms"], "disk.vhdx"))  # the snapshot now pins the old data
        assert "NT_STATUS_LOGON_FAILURE" in daemon.smbclient("vms", "ls", password="wrong")

        deadline = time.monotonic() + 30
        while True:  # zfs-fuse accounts freed space a transaction group later
            text = scrape(daemon.config["metrics"]["port"])
            found = samples(text)
            if (value(found, "fsrvpd_pinned_bytes", share="vms", kind="snapshot") or 0) >= 2 * 1024 * 1024 \
                    or time.monotonic() > deadline:
                break
            time.sleep(1)
        print(text)  # the README's sample scrape comes from here (pytest -s)
        assert daemon.ctl("delete", str(set_id)).returncode == 0
    finally:
        daemon.stop()

    served = {name for name, _ in found}
    missing = {name for name in documented_metrics() if name not in served and f"{name}_bucket" not in served}
    assert not missing, f"documented but not served: {sorted(missing)}"
    undocumented = {re.sub(r"_(bucket|count|sum)$", "", name) for name in served
                    if name.startswith("fsrvpd_") and not name.endswith("_created")} - documented_metrics()
    assert not undocumented, f"served but not in the README: {sorted(undocumented)}"

    assert value(found, "fsrvpd_calls_total", operation="CommitShadowCopySet", result="S_OK") == 1
    assert value(found, "fsrvpd_calls_total", operation="PrepareShadowCopySet", result="FSRVP_E_BAD_STATE") == 1
    assert value(found, "fsrvpd_call_duration_seconds_count", operation="CommitShadowCopySet") == 1
    assert value(found, "fsrvpd_shadow_copy_sets", status="Exposed") == 1
    for share in ("vms", "sql"):
        for metric in ("fsrvpd_snapshots", "fsrvpd_clones", "fsrvpd_exposed_shares"):
            assert value(found, metric, share=share) == 1, (metric, share)
    assert value(found, "fsrvpd_pinned_bytes", share="vms", kind="snapshot") >= 2 * 1024 * 1024
    assert value(found, "fsrvpd_pool_available_bytes", backend="zfs", pool=zfs_pool.name) > 0
    assert value(found, "fsrvpd_storage_commands_total", command="zfs") > 0
    assert value(found, "fsrvpd_refused_callers_total", reason="logon") >= 1
    assert value(found, "fsrvpd_orphans", backend="zfs") == 0
    assert value(found, "fsrvpd_shares") == 2

    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_alert_rules_pass_promtool_and_their_own_unit_tests(promtool):
    for command in (["check", "rules", RULES.name], ["test", "rules", "fsrvpd-alerts.test.yml"]):
        result = subprocess.run([promtool, *command], cwd=RULES.parent, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_rules_and_dashboard_use_only_metrics_fsrvpd_serves():
    expressions = [rule["expr"] for rule in yaml.safe_load(RULES.read_text())["groups"][0]["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for expr in expressions
            for name in re.findall(r"\b(?:fsrvpd|process)_\w+", expr)}
    assert used - documented_metrics() == set()
    assert {"fsrvpd_calls_total", "fsrvpd_orphans", "fsrvpd_pool_available_bytes",
            "fsrvpd_shadow_copy_set_oldest_age_seconds"} <= used
