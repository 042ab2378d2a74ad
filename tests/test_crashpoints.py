"""Crash points: every one the service reaches is listed (so the kill matrix covers it), and an
armed one really kills the process with SIGKILL."""

from __future__ import annotations

import ast
import os
import pathlib
import signal
import subprocess
import sys

import fsrvpd
from fsrvpd.crashpoints import ENVIRONMENT_VARIABLE, POINTS

SOURCE = pathlib.Path(fsrvpd.__file__).parent


def points_in_the_code() -> list[str]:
    found = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "crash_point":
                found += [n.value for n in ast.walk(node.args[0]) if isinstance(n, ast.Constant)]
    return found


def test_every_crash_point_is_listed_once_and_reached_from_the_code():
    in_code = points_in_the_code()
    assert sorted(in_code) == sorted(POINTS)
    assert len(set(POINTS)) == len(POINTS)


def run_with(armed: str, calls: int) -> subprocess.CompletedProcess:
    program = ("from fsrvpd.crashpoints import crash_point\n"
               f"for _ in range({calls}): crash_point('commit.snapshotted')\n"
               "print('alive')")
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**os.environ, ENVIRONMENT_VARIABLE: armed})


def test_an_armed_point_kills_on_its_nth_visit():
    assert run_with("commit.snapshotted", 1).returncode == -signal.SIGKILL
    assert run_with("commit.snapshotted:3", 2).stdout == "alive\n"
    assert run_with("commit.snapshotted:3", 3).returncode == -signal.SIGKILL
    assert run_with("start.persisted", 5).stdout == "alive\n"


def test_an_unknown_point_stops_the_daemon_before_it_starts():
    failed = run_with("commit.snapshoted", 1)
    assert failed.returncode == 1 and "not one of" in failed.stderr
