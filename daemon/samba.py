"""Samba's configuration as fsrvpd reads and changes it: Samba's own tools, run through CommandRunner.

* Reading: `testparm -s` prints the effective configuration, registry shares included, with only
  the parameters that differ from the defaults; `--parameter-name` gives one global's value.
* Snapshot shares live in Samba's registry configuration (`registry shares = yes`): `net conf
  import FILE SHARE` replaces one share in one transaction, `net conf delshare` removes it (and its
  security descriptor), `net conf list` shows them all.  smbd picks a new registry share up at the
  next tree connect; `smbcontrol smbd reload-config` makes running smbd processes drop deleted or
  changed ones at once.  Nothing needs an smbd restart.
* Share security descriptors (share_info.tdb) are copied with `sharesec --viewsddl/--setsddl`.
* RPC-level NTLM (rpc.min_auth_level integrity or privacy) is checked against Samba's own account
  database: `pdbedit -L -w -u USER` prints the account's NT hash and flags (root only).  Local
  (passdb) accounts only: a domain account's hash is in AD, which only winbind can ask.
* Ownership: every share fsrvpd writes carries the parametric option `fsrvpd:base = <base share>`;
  fsrvpd only ever deletes registry shares that carry it.

The parsing helpers are pure; `SambaTools` is the thin I/O part.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from .config import NT_HASH, ShareConfig
from .ntlm import Accounts
from .runner import CommandFailed, CommandRunner
from .transports.base import FrontDoorError

log = logging.getLogger("fsrvpd.samba")

OWNER_PARAMETER = "fsrvpd:base"
SPECIAL_SECTIONS = {"global", "homes", "printers", "print$", "ipc$"}
# What a snapshot share must not inherit from its base share: its own path and writability
# (read-only unless auto-recovery; `write list` would override `read only`), and fsrvpd's tag.
MIN_REREAD_SECONDS = 1.0  # unknown names do not make fsrvpd run testparm more often than this
NOT_COPIED = {"path", "directory", "read only", "writeable", "writable", "write ok", "write list",
              "copy", "include", "comment", OWNER_PARAMETER}


class SambaError(FrontDoorError):
    """A Samba tool failed, or Samba's configuration is not what fsrvpd needs."""


def parse_smb_conf(text: str) -> dict[str, dict[str, str]]:
    """Sections of testparm / `net conf list` output: {section: {parameter: value}}, names as written.

    Parameter names are lowercased (Samba treats them case-insensitively); values are kept.
    """
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif current is not None and "=" in line:
            key, _, value = line.partition("=")
            current[" ".join(key.lower().split())] = value.strip()
    return sections


def is_yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "1", "on")


def base_shares(sections: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Disk shares an FSRVP client may name: not special sections, printers, or fsrvpd's own shares."""
    return {name: params for name, params in sections.items()
            if name.lower() not in SPECIAL_SECTIONS and OWNER_PARAMETER not in params
            and not is_yes(params.get("printable", params.get("print ok"))) and params.get("path")}


def owned_shares(sections: dict[str, dict[str, str]]) -> dict[str, str]:
    """Shares fsrvpd published: {share: base share}."""
    return {name: params[OWNER_PARAMETER] for name, params in sections.items() if OWNER_PARAMETER in params}


def snapshot_share_parameters(base: dict[str, str], path: str, read_only: bool, base_name: str) -> dict[str, str]:
    """The base share's parameters, with the snapshot's path and writability and fsrvpd's tag."""
    params = {key: value for key, value in base.items() if key not in NOT_COPIED}
    params.update({"path": path, "read only": "yes" if read_only else "no",
                   "comment": f"Shadow copy of {base_name}", OWNER_PARAMETER: base_name})
    return params


def render_share(name: str, params: dict[str, str]) -> str:
    for text in (name, *params, *params.values()):
        if "\n" in text or "\r" in text:
            raise SambaError(f"share {name!r}: line breaks cannot be written to Samba's configuration")
    return f"[{name}]\n" + "".join(f"\t{key} = {value}\n" for key, value in params.items())


class SambaTools:
    """Samba's command-line tools, pointed at one smb.conf."""

    def __init__(self, runner: CommandRunner, smb_conf: str, scratch_dir: str, timeout: float = 30.0):
        self.runner = runner
        self.smb_conf = smb_conf
        self.scratch_dir = scratch_dir
        self.timeout = timeout

    def _run(self, *argv: str, check: bool = True) -> str:
        try:
            return self.runner.run(list(argv), timeout=self.timeout, check=check).stdout
        except CommandFailed as exc:
            raise SambaError(str(exc)) from exc

    def parameter(self, name: str) -> str:
        """One global parameter's effective value (defaults included)."""
        return self._run("testparm", "-s", f"--parameter-name={name}", self.smb_conf).strip()

    def sections(self) -> dict[str, dict[str, str]]:
        """The whole effective configuration: smb.conf, its includes and the registry shares."""
        return parse_smb_conf(self._run("testparm", "-s", self.smb_conf))

    def registry_sections(self) -> dict[str, dict[str, str]]:
        return parse_smb_conf(self._run("net", "-s", self.smb_conf, "conf", "list"))

    def put_share(self, name: str, params: dict[str, str]) -> None:
        """Create or replace one registry share in one transaction."""
        os.makedirs(self.scratch_dir, mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.scratch_dir, prefix="share-", suffix=".conf") as text:
            text.write(render_share(name, params))
            text.flush()
            self._run("net", "-s", self.smb_conf, "conf", "import", text.name, name)

    def delete_share(self, name: str) -> None:
        """Remove a registry share and its security descriptor; one that is not there is fine."""
        proc = self.runner.run(["net", "-s", self.smb_conf, "conf", "delshare", name], timeout=self.timeout,
                               check=False)
        if proc.returncode != 0 and "NO_SUCH_SERVICE" not in proc.stdout + proc.stderr:
            raise SambaError(f"net conf delshare {name} exited {proc.returncode}: {proc.stderr.strip()}")

    def security_descriptor(self, share: str) -> str:
        """The share's security descriptor in SDDL (Samba's default one if none is stored)."""
        return self._run("sharesec", "-s", self.smb_conf, share, "--viewsddl").strip()

    def set_security_descriptor(self, share: str, sddl: str) -> None:
        self._run("sharesec", "-s", self.smb_conf, share, f"--setsddl={sddl}")

    def passdb_entry(self, user: str) -> tuple[str, str, str] | None:
        """(account name, NT hash in hex, account flags) from Samba's account database; None if
        there is no such account."""
        proc = self.runner.run(["pdbedit", "-s", self.smb_conf, "-L", "-w", "-u", user], timeout=self.timeout,
                               check=False)
        fields = proc.stdout.strip().split(":") if proc.returncode == 0 else []
        if len(fields) < 5:
            return None
        return fields[0], fields[3], fields[4].strip("[] ")

    def reload_smbd(self) -> None:
        """Tell running smbd processes to re-read the configuration; no smbd running is fine."""
        proc = self.runner.run(["smbcontrol", "-s", self.smb_conf, "smbd", "reload-config"], timeout=self.timeout,
                               check=False)
        if proc.returncode != 0:
            log.debug("smbcontrol reload-config: %s", (proc.stdout + proc.stderr).strip())


class SambaPassdbAccounts(Accounts):
    """The RPC logons of samba mode: Samba's enabled accounts with a password (smbpasswd -a)."""

    def __init__(self, tools: SambaTools) -> None:
        self.tools = tools

    def nt_hash(self, user):
        entry = self.tools.passdb_entry(user)
        if entry is None:
            return None
        name, nt_hash, flags = entry
        if "D" in flags or not NT_HASH.match(nt_hash):  # disabled, or no password set ("NO PASSWORD...")
            return None
        return name, bytes.fromhex(nt_hash)


class SambaShareCatalog:
    """The base shares an FSRVP client may name: Samba's disk shares and their paths, mapped to a
    backend (and optionally a dataset) by fsrvpd's YAML; without a YAML entry a share uses `zfs`
    and the dataset mounted at its path.  Re-read when a name is not found or the copy is old, so
    shares an admin adds to Samba need no fsrvpd restart."""

    def __init__(self, tools: SambaTools, mapped: dict[str, ShareConfig], default_backend: str = "zfs",
                 max_age_seconds: float = 10.0):
        self.tools = tools
        self.mapped = mapped  # casefolded name -> YAML entry (path None)
        self.default_backend = default_backend
        self.max_age_seconds = max_age_seconds
        self._shares: dict[str, ShareConfig] = {}
        self._read_at: float | None = None

    def refresh(self) -> None:
        shares = {}
        for name, params in base_shares(self.tools.sections()).items():
            entry = self.mapped.get(name.casefold())
            shares[name.casefold()] = ShareConfig(
                name=name, path=os.path.normpath(params["path"]),
                backend=entry.backend if entry else self.default_backend,
                store=entry.store if entry else None,
                comment=params.get("comment", ""),
                snapshot_size=entry.snapshot_size if entry else None,
                retention=entry.retention if entry else None)
        missing = sorted(entry.name for key, entry in self.mapped.items() if key not in shares)
        if missing:
            log.warning("shares in fsrvpd's configuration that Samba does not serve: %s", ", ".join(missing))
        self._shares, self._read_at = shares, time.monotonic()

    def shares(self) -> dict[str, ShareConfig]:
        """The shares as last read, keyed by casefolded name (like Config.shares)."""
        return dict(self._shares)

    def lookup(self, name: str) -> ShareConfig | None:
        age = time.monotonic() - self._read_at if self._read_at is not None else None
        stale = age is None or age > self.max_age_seconds
        if stale or (name.casefold() not in self._shares and age > MIN_REREAD_SECONDS):
            try:
                self.refresh()
            except SambaError as exc:
                log.error("cannot read Samba's shares (keeping the last list): %s", exc)
        return self._shares.get(name.casefold())
