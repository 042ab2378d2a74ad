"""The configuration file and the CLI commands around it.

A bad file must stop the daemon before it starts, with `file:line: dotted.key: message` -- so
these tests pin the file, the line and the key of every kind of mistake, not just that one fails.
"""

import io
import pathlib
import subprocess
import sys
import textwrap

import pytest
from impacket.ntlm import compute_nthash

from fsrvpd import cli, config
from fsrvpd.config import ConfigError, load, parse
from fsrvpd.retention import RetentionPolicy

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "etc" / "fsrvpd.example.yaml"
HASH = "0123456789ABCDEF0123456789abcdef"
MINIMAL = f"""\
users:
  backup:
    nt_hash: {HASH}
shares:
  vms:
    path: /tank/vms
"""


def write(tmp_path: pathlib.Path, text: str | bytes) -> str:
    path = tmp_path / "fsrvpd.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


# -- the example file --------------------------------------------------------------------------


def test_example_parses():
    """Admins copy the example: it must be accepted exactly as shipped."""
    example = load(str(EXAMPLE))
    assert example.share("vms").path == "/tank/vms"
    assert example.share("vms").store == "tank/vms"
    assert (example.share("home").backend, example.share("home").store) == ("btrfs", "/home")
    assert (example.sequence_timeout, example.sequence_timeout_long) == (180, 1800)
    assert list(example.users) == ["backup"]


def test_example_spells_out_every_setting(monkeypatch):
    """A key the parser reads but the example leaves out is a setting nobody documented."""
    missing = []
    finish = config._Section.finish

    def recording_finish(section):
        missing.extend(section._key(key) for key in section.used - set(section.items))
        finish(section)

    monkeypatch.setattr(config._Section, "finish", recording_finish)
    load(str(EXAMPLE))
    assert missing == []


# -- defaults ----------------------------------------------------------------------------------


def test_minimal_config_gets_the_documented_defaults():
    """The defaults the example's comments promise are the ones the parser applies."""
    c = parse(MINIMAL, "minimal.yaml")
    assert c.source == "minimal.yaml"
    assert (c.netbios_name, c.fqdn, c.aliases, c.domain) == ("FSRVPD", None, (), "WORKGROUP")
    assert (c.front_door, c.listen, c.port) == ("embedded", "0.0.0.0", 445)
    assert c.users == {"backup": HASH.lower()}
    assert (c.state_dir, c.mount_root) == ("/var/lib/fsrvpd", "/var/lib/fsrvpd/mnt")
    assert (c.sequence_timeout, c.sequence_timeout_long) == (180, 1800)  # MS-FSRVP 3.1.2.1
    assert c.command_timeout == 60
    assert (c.exposure_ttl, c.reconcile_interval) == (86400, 60)
    assert c.shares == {"vms": config.ShareConfig(name="vms", path="/tank/vms", backend="zfs", store=None, comment="")}
    assert c.log_level == "info"


def test_retention_rules_are_optional_each():
    c = parse(MINIMAL + "    retention:\n      keep_last: 3\n")
    assert c.share("vms").retention == RetentionPolicy(keep_last=3, keep_days=None)
    c = parse(MINIMAL + "    retention:\n      keep_days: 0.5\n")
    assert c.share("vms").retention == RetentionPolicy(keep_last=None, keep_days=0.5)


def test_mount_root_follows_state_dir():
    """Moving only the state directory moves the mounts with it."""
    c = parse(MINIMAL + "state_dir: /srv/fsrvpd/\n")
    assert (c.state_dir, c.mount_root) == ("/srv/fsrvpd", "/srv/fsrvpd/mnt")


def test_netbios_name_is_upper_case_and_paths_normalised():
    """Clients compare names case-insensitively; a trailing slash must not make a second path."""
    c = parse(MINIMAL.replace("/tank/vms", "/tank//vms/") + "server:\n  netbios_name: fs-1\n")
    assert c.netbios_name == "FS-1"
    assert c.share("vms").path == "/tank/vms"


# -- mistakes ----------------------------------------------------------------------------------

# (text, line, dotted key, part of the message)
MISTAKES = {
    # unknown keys, including one whose block value starts on the line below it
    "unknown top-level key": ("server:\n  domain: X\nsahres:\n  vms:\n    path: /a\n", 3, "sahres", "not a known"),
    "unknown share key": ("shares:\n  vms:\n    path: /a\n    readonly: true\n", 4, "shares.vms.readonly",
                          "not a known"),
    "misspelt timer": ("timers:\n  sequence_secs: 5\n", 2, "timers.sequence_secs", "not a known"),
    "key twice": ("server:\n  domain: A\n  domain: B\n", 3, "server.domain", "appears twice"),
    # wrong types
    "port not a number": ("front_door:\n  port: smb\n", 2, "front_door.port", "not a whole number"),
    "port a fraction": ("front_door:\n  port: 445.5\n", 2, "front_door.port", "not a whole number"),
    "timer not a number": ("timers:\n  sequence_seconds: soon\n", 2, "timers.sequence_seconds", "not a number"),
    "name a list": ("server:\n  netbios_name: [A, B]\n", 2, "server.netbios_name", "single value"),
    "aliases a string": ("server:\n  aliases: fileserver\n", 2, "server.aliases", "list of names"),
    "section a string": ("server: FSRVPD\n", 1, "server", "must be a mapping"),
    "users a list": ("users:\n  - backup\n", 1, "users", "must be a mapping"),
    "user a string": (f"users:\n  backup: {HASH}\n", 2, "users.backup", "must be a mapping"),
    "share a string": ("shares:\n  vms: /tank/vms\n", 2, "shares.vms", "must be a mapping"),
    "listen a host name": ("front_door:\n  listen: localhost\n", 2, "front_door.listen", "not an IP address"),
    # missing required keys, including a share left empty
    "user without hash": ("users:\n  backup: {}\n", 2, "users.backup.nt_hash", "is required"),
    "share without path": ("shares:\n  vms:\n    comment: VMs\n", 2, "shares.vms.path", "is required"),
    "share left empty": ("\nshares:\n  vms:\n", 3, "shares.vms.path", "is required"),
    # NT hashes
    "hash not hex": ("users:\n  backup:\n    nt_hash: " + "g" * 32 + "\n", 3, "users.backup.nt_hash", "fsrvpd nt-hash"),
    "hash too short": ("users:\n  backup:\n    nt_hash: " + "a" * 31 + "\n", 3, "users.backup.nt_hash", "32 hex"),
    "hash too long": ("users:\n  backup:\n    nt_hash: " + "a" * 33 + "\n", 3, "users.backup.nt_hash", "32 hex"),
    "hash a password": ("users:\n  backup:\n    nt_hash: backup\n", 3, "users.backup.nt_hash", "32 hex"),
    "hash with newline": ("users:\n  backup:\n    nt_hash: |\n      " + "a" * 32 + "\n", 3, "users.backup.nt_hash",
                          "32 hex"),
    # names
    "netbios name too long": ("server:\n  netbios_name: ABCDEFGHIJKLMNOP\n", 2, "server.netbios_name", "1-15"),
    "netbios name with dot": ("server:\n  netbios_name: fs.example\n", 2, "server.netbios_name", "1-15"),
    "share name with slash": ("shares:\n  vm/s:\n    path: /a\n", 2, "shares.vm/s", "not a valid SMB share"),
    "share name with @": ("shares:\n  vms@snap:\n    path: /a\n", 2, "shares.vms@snap", "not a valid SMB share"),
    "share name with colon": ("shares:\n  'c:':\n    path: /a\n", 2, "shares.c:", "not a valid SMB share"),
    "share name with newline": ('shares:\n  "vms\\n":\n    path: /a\n', 2, "shares.vms\n", "not a valid SMB share"),
    "share name too long": (f"shares:\n  {'v' * 81}:\n    path: /a\n", 2, f"shares.{'v' * 81}", "not a valid SMB"),
    "shares differ in case": ("shares:\n  vms:\n    path: /a\n  VMS:\n    path: /b\n", 4, "shares.VMS",
                              "only in case"),
    # relative paths
    "relative share path": ("shares:\n  vms:\n    path: tank/vms\n", 3, "shares.vms.path", "absolute path"),
    "relative state_dir": ("state_dir: var/lib/fsrvpd\n", 1, "state_dir", "absolute path"),
    "relative mount_root": ("mount_root: mnt\n", 1, "mount_root", "absolute path"),
    # choices
    "unknown backend": ("shares:\n  vms:\n    path: /a\n    backend: ceph\n", 4, "shares.vms.backend",
                        "not one of zfs"),
    "unknown front door": ("front_door:\n  mode: smbd\n", 2, "front_door.mode", "not one of embedded, samba"),
    "unknown log level": ("logging:\n  level: verbose\n", 2, "logging.level", "not one of"),
    # ranges
    "port 0": ("front_door:\n  port: 0\n", 2, "front_door.port", "outside 1..65535"),
    "port 65536": ("front_door:\n  port: 65536\n", 2, "front_door.port", "outside 1..65535"),
    "timer 0": ("timers:\n  sequence_seconds: 0\n", 2, "timers.sequence_seconds", "outside"),
    "long timer over a day": ("timers:\n  sequence_long_seconds: 86401\n", 2, "timers.sequence_long_seconds",
                              "outside"),
    "timer not finite": ("timers:\n  sequence_seconds: inf\n", 2, "timers.sequence_seconds", "outside"),
    "negative exposure TTL": ("timers:\n  exposure_ttl_seconds: -1\n", 2, "timers.exposure_ttl_seconds", "outside"),
    "reconcile 0": ("timers:\n  reconcile_seconds: 0\n", 2, "timers.reconcile_seconds", "outside"),
    "retention without a rule": ("shares:\n  vms:\n    path: /a\n    retention: {}\n", 4, "shares.vms.retention",
                                 "keep_last, keep_days or both"),
    "retention keep_last 0": ("shares:\n  vms:\n    path: /a\n    retention:\n      keep_last: 0\n", 5,
                              "shares.vms.retention.keep_last", "outside"),
    "retention misspelt": ("shares:\n  vms:\n    path: /a\n    retention:\n      keep: 3\n", 5,
                           "shares.vms.retention.keep", "not a known"),
    "command timeout over an hour": ("storage:\n  command_timeout_seconds: 3601\n", 2,
                                     "storage.command_timeout_seconds", "outside"),
    # the document as a whole
    "empty file": ("", 1, "(top level)", "no settings"),
    "only comments": ("# server:\n#   netbios_name: X\n", 1, "(top level)", "no settings"),
    "top-level list": ("- server\n- shares\n", 1, "(top level)", "must be a mapping"),
    "top-level scalar": ("fsrvpd\n", 1, "(top level)", "must be a mapping"),
    "list as a key": ("server:\n  ? [a, b]\n  : 1\n", 2, "server", "plain names"),
}


@pytest.mark.parametrize("text, line, key, message", MISTAKES.values(), ids=MISTAKES.keys())
def test_mistake_names_file_line_and_key(tmp_path, text, line, key, message):
    """Each mistake is reported as `file:line: key: message`, pointing at the key at fault."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert (caught.value.source, caught.value.line, caught.value.key) == (path, line, key)
    assert str(caught.value).startswith(f"{path}:{line}: {key}: ")
    assert message in str(caught.value)


YAML_ERRORS = {
    "unclosed flow list": ("server:\n  aliases: [a, b\nshares: {}\n", 3),
    "tab indentation": ("server:\n\tnetbios_name: X\n", 2),
    "bad indentation": ("server:\n  netbios_name: X\n domain: Y\n", 3),
    "unclosed quote": ("server:\n  domain: 'WORK\n", 3),
    "control character": ("server:\n  domain: WORK\x07\n", 2),
    "two documents": ("server: {}\n---\nshares: {}\n", 2),
}


@pytest.mark.parametrize("text, line", YAML_ERRORS.values(), ids=YAML_ERRORS.keys())
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    """Syntax errors come before any key exists, so the file and line are what an admin gets."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        load(path)
    assert caught.value.line == line
    assert str(caught.value).startswith(f"{path}:{line}: not valid YAML")


def test_not_utf8_is_a_config_error(tmp_path):
    """A Latin-1 file must not crash the daemon with UnicodeDecodeError."""
    path = write(tmp_path, b"server:\n  netbios_name: FS\n  domain: CAF\xc9\n")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        load(path)
    assert caught.value.line == 3


def test_unreadable_file_is_a_config_error(tmp_path):
    """A missing file is reported like any other configuration problem."""
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load(str(tmp_path / "absent.yaml"))
    assert str(caught.value).startswith(str(tmp_path / "absent.yaml"))


# -- lookups -----------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", ["VMs", "vms", "VMS", "vMs"])
def test_share_lookup_is_case_insensitive(asked):
    """SMB share names are case-insensitive; the configured spelling is kept for display."""
    c = parse(MINIMAL.replace("vms:", "VMs:"))
    assert c.share(asked).name == "VMs"
    assert c.share("other") is None


def test_own_host_names_cover_every_configured_name():
    """A UNC may name the server by any configured name or address, in any case."""
    c = parse(MINIMAL + textwrap.dedent("""\
        server:
          netbios_name: fs1
          fqdn: FS1.Example.COM
          aliases: [FileServer, 192.0.2.10]
        front_door:
          listen: FD00::5
        """))
    assert {"fs1", "fs1.example.com", "fileserver", "192.0.2.10", "fd00::5"} <= c.own_host_names()
    assert all(name == name.casefold() for name in c.own_host_names())


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"])
def test_wildcard_listen_address_is_not_a_host_name(listen):
    """'Every address' is not an address a client can name."""
    c = parse(MINIMAL + f"front_door:\n  listen: '{listen}'\n")
    assert listen not in c.own_host_names()


# -- the CLI -----------------------------------------------------------------------------------

BAD = "shares:\n  vms:\n    comment: VMs\n    path: tank/vms\n"


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_cli_bad_config_exits_2_with_location(tmp_path, capsys, command):
    """Both check-config and run refuse a bad file before doing anything else."""
    path = write(tmp_path, BAD)
    assert cli.main([command, "-c", path]) == 2
    out, err = capsys.readouterr()
    assert f"{path}:4: shares.vms.path: 'tank/vms' must be an absolute path" in err
    assert out == ""


def test_cli_module_exit_status(tmp_path):
    """`python -m fsrvpd` turns the return value into the process exit status."""
    path = write(tmp_path, BAD)
    done = subprocess.run([sys.executable, "-m", "fsrvpd", "check-config", "-c", path],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{path}:4: shares.vms.path: " in done.stderr


def test_cli_check_config_accepts_the_example(capsys):
    """The shipped example passes the check the admin is told to run."""
    assert cli.main(["check-config", "-c", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert "OK (3 share(s), 1 user(s))" in out
    assert err == ""


def test_cli_nt_hash_argument(capsys):
    """`fsrvpd nt-hash` prints what the embedded server checks NTLM logins against."""
    assert cli.main(["nt-hash", "backup"]) == 0
    assert capsys.readouterr().out == compute_nthash("backup").hex() + "\n"


def test_cli_nt_hash_from_stdin(capsys, monkeypatch):
    """Scripts pipe the password in, so it never shows in ps or shell history."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("backup\n"))
    assert cli.main(["nt-hash"]) == 0
    assert capsys.readouterr().out == compute_nthash("backup").hex() + "\n"
