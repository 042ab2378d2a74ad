"""Debian packages the tests need, installed once when their tools are missing (idempotent)."""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["ensure_tools"]

_updated = False


def ensure_tools(packages: dict[str, str]) -> None:
    """Install the package of every tool (tool name -> Debian package) that is not on the PATH."""
    global _updated
    missing = sorted({package for tool, package in packages.items() if shutil.which(tool) is None})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _updated:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        _updated = True
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)
