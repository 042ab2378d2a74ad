"""`fsrvpctl`: ask the running fsrvpd what it holds, and tidy up -- over its admin socket (root only).

Exit codes, for scripts:
  0  done; for `doctor`, the share can be shadow-copied
  1  the daemon refused or the operation failed (unknown set, snapshot not found, ...); for
     `doctor`, the share cannot be shadow-copied
  2  wrong usage, or a configuration file that cannot be read
  3  no answer: the daemon is not running, or the socket is not ours to use
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from .config import DEFAULT_ADMIN_SOCKET, ConfigError, load

DEFAULT_CONFIG = "/etc/fsrvpd/fsrvpd.yaml"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
RECENT_SHOWN = 5
ANSWER_TIMEOUT_SECONDS = 600  # `delete` and `prune` wait for the service's lock and for storage


class Unreachable(Exception):
    pass


def request(path: str, command: str, **args) -> dict:
    """One request to the admin socket; the decoded answer."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(ANSWER_TIMEOUT_SECONDS)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command, "args": args}).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    except OSError as exc:
        raise Unreachable(f"cannot reach fsrvpd at {path}: {exc.strerror or exc}") from None
    if not answer:
        raise Unreachable(f"fsrvpd at {path} closed the connection without answering")
    return json.loads(answer)


# -- human output ---------------------------------------------------------------------------------
def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def show_status(result: dict) -> str:
    door = result["front_door"]
    lines = [
        f"fsrvpd {result['version']}, pid {result['pid']}, up {age(result['uptime_seconds'])}, "
        f"logging to {result['logging']}",
        f"config:      {result['config']}",
        f"front door:  {door['mode']} SMB server \\\\{door['server_name']} on {door['listen']} port {door['port']}",
        f"metrics:     {result['metrics'] or 'off'}",
        f"shares:      {', '.join(result['shares']) or 'none'}",
        "sets:        " + (", ".join(f"{count} {status}" for status, count in result["sets"].items() if count)
                           or "none"),
    ]
    context = result["context"]
    if context["set"]:
        timer = context["timer_seconds_left"]
        lines.append(f"context:     set by {context['client']}" + (f", sequence timer fires in {age(max(timer, 0))}"
                                                                   if timer is not None else ""))
    if result["last_reload"]:
        reload = result["last_reload"]
        lines.append(f"last reload: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(reload['at']))} "
                     f"{'ok' if reload['ok'] else 'FAILED'}: {reload['message']}")
    commands = result["storage_commands"]
    if commands:
        lines.append("storage:     " + ", ".join(f"{tool} {stats['calls']} run(s), {stats['failures']} failed, "
                                                 f"{stats['seconds']:.2f}s" for tool, stats in commands.items()))
    problems = result["recent_problems"][-RECENT_SHOWN:]
    if problems:
        lines.append("recent problems (newest last; the journal has them all):")
        lines += [f"  {time.strftime('%H:%M:%S', time.localtime(p['at']))} {p['level']:<7} {p['message']}"
                  for p in problems]
    return "\n".join(lines)


def show_sets(result: list[dict]) -> str:
    if not result:
        return "no shadow copy sets"
    return table([[s["set_id"], s["status"], s["context"], age(s["age_seconds"]), ",".join(s["shares"]),
                   s["principal"]] for s in result],
                 ["SET", "STATUS", "CONTEXT", "AGE", "SHARES", "CLIENT"])


def show_shares(result: dict) -> str:
    parts = [table([[s["name"], s["path"], s["backend"] + (f" {s['store']}" if s["store"] else ""), s["copies"],
                     "yes" if s["published"] else "NO"] for s in result["shares"]],
                   ["SHARE", "PATH", "BACKEND", "COPIES", "PUBLISHED"])]
    if result["shadow_copy_shares"]:
        parts.append(table([[s["name"], s["set_id"], "read-only" if s["read_only"] else "writable",
                             s["restore_of"] or "", s["path"]] for s in result["shadow_copy_shares"]],
                           ["SHADOW COPY SHARE", "SET", "ACCESS", "RESTORE OF", "PATH"]))
    return "\n\n".join(parts)


def show_set(result: dict) -> str:
    copies = "; ".join(f"{c['share']} as {c['exposed_as']}" if c["exposed_as"] else c["share"]
                       for c in result["copies"])
    return f"set {result['set_id']} ({result['status']}): {copies}"


def show_retained(result: list[dict]) -> str:
    if not result:
        return "no retained copies"
    return table([[c["copy_id"], c["share"], c["store"], age(c["age_seconds"]), c["with_exposure"] or ""]
                  for c in result], ["COPY", "SHARE", "STORE", "AGE", "RECOVERED CLONE KEPT AT"])


def show_unretained(result: dict) -> str:
    return f"retained copy {result['copy_id']} of {result['share']} removed"


def show_prune(result: dict) -> str:
    return f"{result['expired_sets']} expired set(s) removed, {result['orphans_removed']} orphaned object(s) removed"


def show_reload(result: dict) -> str:
    return f"configuration reloaded: {result['message']}"


def show_doctor(result: dict) -> str:
    marks = {"ok": "ok", "warning": "WARNING", "problem": "PROBLEM"}
    lines = [f"{marks[c['state']]:<8} {c['check']}: {c['detail']}" for c in result["checks"]]
    verdict = "can" if result["can_shadow_copy"] else "CANNOT"
    return "\n".join(lines + ["", f"{result['share']} {verdict} be shadow-copied."])


SHOW = {"status": show_status, "sets": show_sets, "shares": show_shares, "delete": show_set, "prune": show_prune,
        "expose": show_set, "reload": show_reload, "doctor": show_doctor, "retained": show_retained,
        "unretain": show_unretained}


def socket_path(args: argparse.Namespace) -> str:
    """-s wins; else the admin socket the configuration names; else the default."""
    if args.socket:
        return args.socket
    try:
        return load(args.config).admin_socket
    except ConfigError:
        if args.config != DEFAULT_CONFIG:
            raise
        return DEFAULT_ADMIN_SOCKET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsrvpctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="the daemon's configuration (to find its "
                        "admin socket); default %(default)s")
    parser.add_argument("-s", "--socket", help=f"the admin socket (default: from the configuration, else "
                        f"{DEFAULT_ADMIN_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print the daemon's answer as JSON, for scripts")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("status", help="what the daemon is and holds, in a few lines")
    commands.add_parser("sets", help="shadow copy sets: status, context, age, shares, client")
    commands.add_parser("shares", help="configured shares and the shadow copy shares exposed")
    commands.add_parser("delete", help="delete a set with its snapshots, clones and shares").add_argument("set_id")
    commands.add_parser("prune", help="remove expired sets and orphaned storage now")
    commands.add_parser("expose", help="publish an existing snapshot read-only, e.g. for a restore").add_argument(
        "snapshot", help="e.g. tank/vms@daily-2024-05-01")
    commands.add_parser("retained", help="copies kept by retention after DeleteShareMapping (oldest first)")
    commands.add_parser("unretain", help="remove a retained copy now, snapshot and all").add_argument("copy_id")
    commands.add_parser("reload", help="reload the configuration file (as SIGHUP does) and say if it was good")
    commands.add_parser("doctor", help="can this share be shadow-copied? why not?").add_argument("share")
    args = parser.parse_args(argv)
    command_args = {key: value for key, value in vars(args).items()
                    if key not in ("config", "socket", "json", "command")}
    try:
        answer = request(socket_path(args), args.command, **command_args)
    except ConfigError as exc:
        print(f"fsrvpctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"fsrvpctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if not answer["ok"]:
        if args.json:
            print(json.dumps(answer, indent=2))
        else:
            print(f"fsrvpctl: {args.command}: {answer['error']} ({answer['code']})", file=sys.stderr)
        return EXIT_UNREACHABLE if answer["code"] == "permission_denied" else EXIT_FAILED
    result = answer["result"]
    print(json.dumps(result, indent=2) if args.json else SHOW[args.command](result))
    if args.command == "doctor" and not result["can_shadow_copy"]:
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
