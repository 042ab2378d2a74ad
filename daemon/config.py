"""The daemon's YAML configuration: parsed once, checked whole, reported by file, line and key.

A bad file must stop the daemon before anything starts, with a message an admin can act on
(`/etc/fsrvpd/fsrvpd.yaml:12: shares.vms.path: must be an absolute path`), so parsing works on
YAML nodes (which carry line numbers) rather than on plain Python values.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from typing import TYPE_CHECKING

import yaml

from .rpcauth import AuthLevel
from .retention import RetentionPolicy

if TYPE_CHECKING:
    from .backends.lvm import SnapshotSize

DEFAULT_STATE_DIR = "/var/lib/fsrvpd"
DEFAULT_ADMIN_SOCKET = "/run/fsrvpd/admin.sock"  # systemd's RuntimeDirectory=fsrvpd
BACKENDS = ("zfs", "lvm", "btrfs")
# The share key that names its store explicitly (btrfs: the subvolume's path in its file system).
STORE_KEYS = {"zfs": "dataset", "lvm": "volume", "btrfs": "subvolume"}
LVM_VOLUME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
FRONT_DOORS = ("embedded", "samba")
DEFAULT_SMB_CONF = "/etc/samba/smb.conf"
LOG_LEVELS = ("debug", "info", "warning", "error")
# SMB share names: printable, no path or wildcard characters; '@' is kept for snapshot shares.
SHARE_NAME = re.compile(r"^[^\x00-\x1f\"\\/\[\]:|<>+=;,*?@{}]{1,80}$")
NETBIOS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")
NT_HASH = re.compile(r"^[0-9a-fA-F]{32}$")
# rpc.min_auth_level: `none` serves unauthenticated binds as Samba does (the default in samba mode,
# where smbd has authenticated the session and domain accounts have no hash fsrvpd could check);
# MS-FSRVP 3.1.4 asks for packet integrity or privacy.
MIN_AUTH_LEVELS = {"none": AuthLevel.NONE, "integrity": AuthLevel.PKT_INTEGRITY, "privacy": AuthLevel.PKT_PRIVACY}


class ConfigError(Exception):
    """A problem in the configuration file, located by line and dotted key."""

    def __init__(self, source: str, line: int | None, key: str, message: str):
        self.source, self.line, self.key = source, line, key
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class ShareConfig:
    name: str
    path: str | None  # None in samba mode: Samba's configuration has the path
    backend: str
    store: str | None  # explicit dataset/volume; None = detect from the path
    comment: str
    snapshot_size: SnapshotSize | None = None  # classic (thick) LVM volumes only
    retention: RetentionPolicy | None = None  # keep completed backups' snapshots after DeleteShareMapping


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may take of the daemon; each has a safe default (see etc/fsrvpd.example.yaml)."""

    max_shares_per_set: int = 64  # as Windows
    max_fragment_bytes: int = 4280  # largest DCE/RPC fragment received or sent (SMB pipes use 4280)
    max_request_bytes: int = 65536  # largest reassembled request; FSRVP's largest is a few KiB
    max_string_chars: int = 1024  # longest NDR string (a UNC path), in UTF-16 units with the NUL
    max_connections_per_client: int = 16  # open SMB connections and FSRVP pipes per client address
    max_calls_per_second: float = 50  # per client address, with bursts of as many calls


@dataclasses.dataclass(frozen=True)
class Config:
    source: str
    netbios_name: str
    fqdn: str | None
    aliases: tuple[str, ...]
    front_door: str
    listen: str
    port: int
    smb_conf: str  # samba mode: the smb.conf smbd runs with
    domain: str
    users: dict[str, str]  # user name -> NT hash (hex)
    state_dir: str
    mount_root: str
    sequence_timeout: float
    sequence_timeout_long: float
    exposure_ttl: float  # non-persistent sets still exposed after this long are reaped; 0: never
    reconcile_interval: float
    cleanup_quiet: float  # storage work queued after answers waits until no call came for this long
    command_timeout: float
    shares: dict[str, ShareConfig]  # keyed by casefolded share name
    log_level: str
    metrics_listen: str
    metrics_port: int | None  # None: no metrics endpoint
    admin_socket: str
    allowed: tuple[str, ...] = ()  # SIDs and account names allowed to change state, besides the built-in groups
    allowed_clients: tuple[str, ...] = ()  # IP networks callers must come from; empty: any
    open_queries: bool = False  # the three read-only queries for any authenticated caller
    min_auth_level: AuthLevel = AuthLevel.PKT_INTEGRITY
    limits: Limits = Limits()

    def share(self, name: str) -> ShareConfig | None:
        """SMB share names are case-insensitive."""
        return self.shares.get(name.casefold())

    def own_host_names(self) -> set[str]:
        """Every name or address a UNC may use to mean this server (casefolded)."""
        names = {self.netbios_name, *self.aliases, "localhost", "127.0.0.1", "::1"}
        if self.fqdn:
            names.add(self.fqdn)
        if self.listen not in ("0.0.0.0", "::"):
            names.add(self.listen)
        return {name.casefold() for name in names}


class _Section:
    """A YAML mapping being read: typed getters that know the key's line, and unknown-key checks."""

    def __init__(self, source: str, node: yaml.Node | None, path: str, line: int | None = None):
        self.source, self.path = source, path
        # The line of the section's own key if it has one: a block mapping starts a line below it.
        self.line = line or (node.start_mark.line + 1 if node is not None else None)
        if node is not None and not isinstance(node, yaml.MappingNode):
            raise ConfigError(source, self.line, path or "(top level)", "must be a mapping of keys to values")
        self.items: dict[str, yaml.Node] = {}
        self.key_lines: dict[str, int] = {}
        for key_node, value_node in node.value if node is not None else []:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(source, key_node.start_mark.line + 1, path or "(top level)",
                                  "keys must be plain names, not lists or mappings")
            key = str(key_node.value)
            if key in self.items:
                raise ConfigError(source, key_node.start_mark.line + 1, self._key(key), "appears twice")
            self.items[key] = value_node
            self.key_lines[key] = key_node.start_mark.line + 1
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key_lines.get(key, self.line), self._key(key), message)

    def _scalar(self, key: str, required: bool) -> yaml.ScalarNode | None:
        self.used.add(key)
        node = self.items.get(key)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            if required:
                raise self.error(key, "is required")
            return None
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(key, "must be a single value, not a list or mapping")
        return node

    def text(self, key: str, default: str | None = None, required: bool = False, pattern: re.Pattern | None = None,
             hint: str = "") -> str | None:
        node = self._scalar(key, required)
        if node is None:
            return default
        value = str(node.value)
        if pattern is not None and not pattern.fullmatch(value):
            raise self.error(key, f"{value!r} is not valid{': ' + hint if hint else ''}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def ip_address(self, key: str, default: str) -> str:
        value = self.text(key, default)
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an IP address") from None
        return value

    def flag(self, key: str, default: bool) -> bool:
        node = self._scalar(key, False)
        if node is None:
            return default
        value = yaml.safe_load(node.value) if node.tag.endswith(":bool") else node.value
        if not isinstance(value, bool):
            raise self.error(key, f"{node.value!r} must be true or false")
        return value

    def networks(self, key: str) -> tuple[str, ...]:
        """IP addresses or networks (CIDR), checked and normalised."""
        networks = []
        for value in self.text_list(key):
            try:
                networks.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                raise self.error(key, f"{value!r} is not an IP address or network") from None
        return tuple(networks)

    def number(self, key: str, default: float | None, minimum: float, maximum: float,
               integer: bool = False) -> float | None:
        node = self._scalar(key, False)
        if node is None:
            return default
        try:
            value = int(node.value) if integer else float(node.value)
        except ValueError:
            raise self.error(key, f"{node.value!r} is not a {'whole ' if integer else ''}number") from None
        if not minimum <= value <= maximum:
            raise self.error(key, f"{value} is outside {minimum}..{maximum}")
        return value

    def absolute_path(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.text(key, default, required)
        if value is not None and not os.path.isabs(value):
            raise self.error(key, f"{value!r} must be an absolute path")
        return os.path.normpath(value) if value is not None else None

    def text_list(self, key: str) -> tuple[str, ...]:
        self.used.add(key)
        node = self.items.get(key)
        if node is None:
            return ()
        if not isinstance(node, yaml.SequenceNode) or not all(isinstance(n, yaml.ScalarNode) for n in node.value):
            raise self.error(key, "must be a list of names")
        return tuple(str(n.value) for n in node.value)

    def section(self, key: str) -> _Section:
        self.used.add(key)
        node = self.items.get(key)
        if node is not None and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            node = None
        return _Section(self.source, node, self._key(key), self.key_lines.get(key))

    def subsections(self, key: str) -> list[tuple[str, _Section]]:
        parent = self.section(key)
        parent.used.update(parent.items)
        return [(name, parent.section(name)) for name in parent.items]

    def finish(self) -> None:
        """Unknown keys are errors: a typo must not silently fall back to a default."""
        for key in self.items:
            if key not in self.used:
                raise self.error(key, "is not a known setting")


def _snapshot_size(share: _Section) -> SnapshotSize:
    # Imported here: fsrvpctl reads configurations too, and has no backends to load.
    from .backends.lvm import DEFAULT_SNAPSHOT_SIZE, SnapshotSize

    text = share.text("snapshot_size", DEFAULT_SNAPSHOT_SIZE)
    try:
        return SnapshotSize.parse(text)
    except ValueError as exc:
        raise share.error("snapshot_size", str(exc)) from None


def parse(text: str, source: str = "<config>") -> Config:
    """Parse and check a whole configuration; raise ConfigError at the first problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(exc, yaml.reader.ReaderError):  # a forbidden character: only its offset is known
            line = text.count("\n", 0, exc.position) + 1
        else:
            line = None
        raise ConfigError(source, line, "", f"not valid YAML: {exc}") from None
    if root is None:
        raise ConfigError(source, 1, "(top level)", "has no settings (the file is empty or only comments)")
    top = _Section(source, root, "")

    server = top.section("server")
    netbios_name = server.text("netbios_name", "FSRVPD", pattern=NETBIOS_NAME,
                               hint="1-15 letters, digits, '-' or '_'").upper()
    fqdn = server.text("fqdn")
    aliases = server.text_list("aliases")
    domain = server.text("domain", "WORKGROUP")
    server.finish()

    front = top.section("front_door")
    mode = front.choice("mode", FRONT_DOORS, "embedded")
    listen = front.ip_address("listen", "0.0.0.0")
    port = int(front.number("port", 445, 1, 65535, integer=True))
    smb_conf = front.absolute_path("smb_conf", DEFAULT_SMB_CONF)
    front.finish()
    samba = mode == "samba"

    users = {}
    for name, user in top.subsections("users"):
        if samba:
            raise top.section("users").error(name, "users belong to Samba in samba mode (smbpasswd, AD)")
        nt_hash = user.text("nt_hash", required=True, pattern=NT_HASH,
                            hint="32 hex digits; make one with `fsrvpd nt-hash`")
        users[name] = nt_hash.lower()
        user.finish()

    state_dir = top.absolute_path("state_dir", DEFAULT_STATE_DIR)
    mount_root = top.absolute_path("mount_root", os.path.join(state_dir, "mnt"))

    timers = top.section("timers")
    sequence_timeout = timers.number("sequence_seconds", 180, 1, 86400)
    sequence_timeout_long = timers.number("sequence_long_seconds", 1800, 1, 86400)
    exposure_ttl = timers.number("exposure_ttl_seconds", 86400, 0, 10 * 365 * 86400)
    reconcile_interval = timers.number("reconcile_seconds", 60, 1, 86400)
    cleanup_quiet = timers.number("cleanup_quiet_seconds", 0.2, 0, 60)
    timers.finish()

    storage = top.section("storage")
    command_timeout = storage.number("command_timeout_seconds", 60, 1, 3600)
    storage.finish()

    shares: dict[str, ShareConfig] = {}
    for name, share in top.subsections("shares"):
        if not SHARE_NAME.fullmatch(name):
            raise top.section("shares").error(name, "is not a valid SMB share name")
        if name.casefold() in shares:
            raise top.section("shares").error(name, "differs from another share only in case")
        backend = share.choice("backend", BACKENDS, "zfs")
        if samba and "path" in share.items:
            raise share.error("path", "comes from Samba's configuration in samba mode; leave it out")
        shares[name.casefold()] = ShareConfig(
            name=name,
            path=None if samba else share.absolute_path("path", required=True),
            backend=backend,
            store=share.text(STORE_KEYS[backend], pattern=LVM_VOLUME if backend == "lvm" else None,
                             hint="VG/LV, like vg0/vms"),
            comment=share.text("comment", ""),
            snapshot_size=_snapshot_size(share) if backend == "lvm" else None,
            retention=_retention(share),
        )
        share.finish()

    authorization = top.section("authorization")
    allowed = authorization.text_list("allow")
    allowed_clients = authorization.networks("clients")
    open_queries = authorization.flag("open_queries", False)
    authorization.finish()

    rpc = top.section("rpc")
    min_auth_level = MIN_AUTH_LEVELS[rpc.choice("min_auth_level", tuple(MIN_AUTH_LEVELS),
                                                "none" if samba else "integrity")]
    rpc.finish()

    limits = _limits(top.section("limits"))

    logging_section = top.section("logging")
    log_level = logging_section.choice("level", LOG_LEVELS, "info")
    logging_section.finish()

    metrics = top.section("metrics")
    metrics_listen = metrics.ip_address("listen", "127.0.0.1")
    metrics_port = metrics.number("port", None, 1, 65535, integer=True)
    metrics.finish()

    admin = top.section("admin")
    admin_socket = admin.absolute_path("socket", DEFAULT_ADMIN_SOCKET)
    admin.finish()
    top.finish()

    return Config(source=source, netbios_name=netbios_name, fqdn=fqdn, aliases=aliases, front_door=mode,
                  listen=listen, port=port, smb_conf=smb_conf, domain=domain, users=users, state_dir=state_dir,
                  mount_root=mount_root,
                  sequence_timeout=sequence_timeout, sequence_timeout_long=sequence_timeout_long,
                  exposure_ttl=exposure_ttl, reconcile_interval=reconcile_interval, cleanup_quiet=cleanup_quiet,
                  command_timeout=command_timeout,
                  shares=shares, log_level=log_level, metrics_listen=metrics_listen, metrics_port=metrics_port,
                  admin_socket=admin_socket, allowed=allowed, allowed_clients=allowed_clients,
                  open_queries=open_queries, min_auth_level=min_auth_level, limits=limits)


def _retention(share: _Section) -> RetentionPolicy | None:
    """`retention:` with keep_last, keep_days or both; absent: nothing is kept after DeleteShareMapping."""
    if "retention" not in share.items:
        return None
    section = share.section("retention")
    keep_last = section.number("keep_last", None, 1, 1_000_000, integer=True)
    keep_days = section.number("keep_days", None, 0.001, 36500)
    previous_versions = section.flag("previous_versions", False)
    section.finish()
    if keep_last is None and keep_days is None:
        raise share.error("retention", "needs keep_last, keep_days or both")
    return RetentionPolicy(keep_last=None if keep_last is None else int(keep_last), keep_days=keep_days,
                           previous_versions=previous_versions)


def _limits(section: _Section) -> Limits:
    default = Limits()
    limits = Limits(
        max_shares_per_set=int(section.number("max_shares_per_set", default.max_shares_per_set, 1, 512,
                                              integer=True)),
        max_fragment_bytes=int(section.number("max_fragment_bytes", default.max_fragment_bytes, 1432, 65535,
                                              integer=True)),
        max_request_bytes=int(section.number("max_request_bytes", default.max_request_bytes, 4096, 16 << 20,
                                             integer=True)),
        max_string_chars=int(section.number("max_string_chars", default.max_string_chars, 260, 32768,
                                            integer=True)),
        max_connections_per_client=int(section.number("max_connections_per_client",
                                                      default.max_connections_per_client, 1, 4096, integer=True)),
        max_calls_per_second=section.number("max_calls_per_second", default.max_calls_per_second, 0.1, 100000),
    )
    section.finish()
    return limits


def load(path: str) -> Config:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(path, None, "", f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, data.count(b"\n", 0, exc.start) + 1, "", "is not UTF-8 text") from None
    return parse(text, path)
