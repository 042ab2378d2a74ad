"""The benchmark's results as one table (text and Markdown), a JSON file and a PNG chart.

Every ratio is fsrvpd ÷ Samba or fsrvpd ÷ storage, on p50 latencies, so below 1 means fsrvpd is
faster. The targets of issue 9 are checked at the end of the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.measure import CYCLE, FLOOR_AFTER, OPERATIONS, SETTLED

TARGET_CYCLE_RATIO = 0.5  # full cycle ≤ 0.5 × Samba's on the same backend
TARGET_COMMIT_OVER_FLOOR = 1.2  # commit ≤ 1.2 × the raw floor
TARGET_MANY_SNAPSHOTS = 1.2  # commit with 10,000 snapshots ≤ 1.2 × with none
TARGET_RSS_MB = 60.0  # at 1,000 exposed sets (10^6 bytes)
COMMIT = "CommitShadowCopySet"
SHARE_TOOLS = "share tools"  # bench.__main__.cycles_phase: Samba's tools per share, behind smbd


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def _p50(entry: dict | None) -> float | None:
    return entry["p50_ms"] if entry else None


def calls_per_cycle(shares: int) -> int:
    """SetContext, Start, Add×n, Prepare, Commit, Expose, GetShareMapping×n, RecoveryComplete, Delete×n."""
    return 3 * shares + 6


def _op(results: dict, backend: str, server: str, size: int | str, operation: str, many: bool = False) -> dict | None:
    cycles = results["many_snapshots"].get(backend, {}).get("cycles", {}) if many else results["cycles"][backend]
    return cycles.get(server, {}).get(str(size), {}).get(operation)


def _floor(results: dict, backend: str, size: int | str, part: str, many: bool = False) -> float | None:
    floors = results["many_snapshots"].get(backend, {}).get("floor", {}) if many else results["floor"][backend]
    return _p50(floors.get(str(size), {}).get(part))


def _cheapest_call(results: dict, backend: str, size: int | str) -> float | None:
    """The p50 of the cheapest call (GetSupportedVersion) of any server: the client, SMB and RPC stack alone."""
    values = [_p50(_op(results, backend, server, size, "GetSupportedVersion")) for server in results["servers"][backend]]
    values = [value for value in values if value is not None]
    return min(values) if values else None


def _ours(results: dict, backend: str) -> list[str]:
    """The fsrvpd servers that ran on `backend`."""
    return [server for server in results["fsrvpd_servers"] if server in results["servers"][backend]]


def share_tools_ms(results: dict, backend: str, server: str) -> float | None:
    """Behind smbd: Samba's tools alone for one snapshot share, published and withdrawn (p50s)."""
    tools = results["cycles"][backend].get(server, {}).get(SHARE_TOOLS)
    return tools["publish"]["p50_ms"] + tools["withdraw"]["p50_ms"] if tools else None


def cycle_floor(results: dict, backend: str, size: int, server: str | None = None) -> dict[str, float | None]:
    """The fastest full cycle any server could reach here: the cycle's calls at the cheapest call's
    latency (client, SMB and RPC stack alone), plus the storage commands that must have run before
    Commit and Expose answer (the snapshots and their exposures; removal may follow the answers,
    as both servers do it), plus, for `server` behind smbd, Samba's tools for each share."""
    cheapest = _cheapest_call(results, backend, size)
    protocol = calls_per_cycle(size) * cheapest if cheapest is not None else None
    storage = _floor(results, backend, size, "exposed")
    tools = size * (share_tools_ms(results, backend, server) or 0) if server else 0
    return {"protocol_ms": protocol, "storage_ms": storage,
            "total_ms": protocol + storage + tools if protocol is not None and storage is not None else None}


def targets(results: dict) -> list[dict[str, Any]]:
    """Each target with the measured value, whether it is met, and where it cannot be, why."""
    checks = []
    reference = results["reference_server"]
    largest = max(results["set_sizes"])
    for backend in results["cycles"]:
        for ours in _ours(results, backend):
            for size in results["set_sizes"]:
                mine, theirs = (_p50(_op(results, backend, server, size, CYCLE)) for server in (ours, reference))
                floor = cycle_floor(results, backend, size, ours)["total_ms"]
                tools = share_tools_ms(results, backend, ours)
                check = {"target": f"{backend}, {ours}: full cycle of {size} share(s) ÷ Samba's",
                         "limit": TARGET_CYCLE_RATIO, "value": _ratio(mine, theirs)}
                if floor is not None and theirs is not None and TARGET_CYCLE_RATIO * theirs < floor:
                    check["out_of_reach"] = True
                    check["why"] = (f"out of reach {'behind smbd' if tools else 'for any server'} with this client: "
                                    f"{TARGET_CYCLE_RATIO} × Samba's "
                                    f"{theirs:.0f} ms is below the {floor:.0f} ms that the cycle's calls at the "
                                    "cheapest call's latency and the snapshots and exposures alone take"
                                    + (f", with Samba's own tools for each share ({tools:.0f} ms to publish and "
                                       "withdraw one)" if tools else ""))
                checks.append(check)
            commit, floor = _p50(_op(results, backend, ours, largest, COMMIT)), _floor(results, backend, largest, "commit")
            check = {"target": f"{backend}, {ours}: Commit of {largest} shares ÷ the raw floor",
                     "limit": TARGET_COMMIT_OVER_FLOOR, "value": _ratio(commit, floor)}
            tagged, call = _floor(results, backend, largest, "tagged"), _cheapest_call(results, backend, largest)
            if tagged is not None and call is not None:
                check["out_of_reach"] = floor is not None and tagged + call > TARGET_COMMIT_OVER_FLOOR * floor
                check["why"] = (f"the least a Commit call takes on this storage: the snapshots with the ownership tag "
                                f"fsrvpd sets as they are taken (`zfs snapshot -o`, {tagged:.0f} ms) and one call at "
                                f"the cheapest call's latency ({call:.1f} ms); Commit ÷ that: "
                                f"{_ratio(commit, tagged + call):.2f}×")
            checks.append(check)
            many = results["many_snapshots"].get(backend)
            if many:
                checks.append(_many_snapshots_check(results, backend, ours, many))
    rss = results.get("rss")
    if rss:
        checks.append({"target": f"{rss['backend']}, {rss['server']}: RSS at {rss['sets']} exposed sets (MB)",
                       "limit": TARGET_RSS_MB, "value": rss["kib"][str(rss["sets"])] * 1024 / 1e6})
    for check in checks:
        check["met"] = check["value"] is not None and check["value"] <= check["limit"]
        check["status"] = "met" if check["met"] else "out of reach" if check.pop("out_of_reach", False) else "not met"
    return checks


def _many_snapshots_check(results: dict, backend: str, ours: str, many: dict) -> dict[str, Any]:
    """Commit with many snapshots ÷ with none. Out of reach when the storage alone, timed right after
    each of this server's cycles, slowed down so much between the two runs that Commit ÷ the
    storage's slow-down is within the limit: the rest of the slow-down is the storage's."""
    size = many["shares"]
    value = _ratio(_p50(_op(results, backend, ours, size, COMMIT, many=True)),
                   _p50(_op(results, backend, ours, size, COMMIT)))
    check = {"target": f"{backend}, {ours}: Commit of {size} shares with {many['snapshots']} snapshots on the storage "
                       "÷ with none", "limit": TARGET_MANY_SNAPSHOTS, "value": value}
    with_many, without = (_p50(_op(results, backend, ours, size, FLOOR_AFTER, many=flag)) for flag in (True, False))
    storage = _ratio(with_many, without)
    if value is None or storage is None:
        return check
    check["out_of_reach"] = value / storage <= TARGET_MANY_SNAPSHOTS
    tagged = _ratio(_floor(results, backend, size, "tagged", many=True), _floor(results, backend, size, "tagged"))
    check["why"] = (f"the storage alone, timed right after each of this server's cycles: {storage:.2f}× "
                    f"({with_many:.0f} ms with {many['snapshots']} snapshots, {without:.0f} ms with none)"
                    + (f", tagged as fsrvpd tags them (all servers' turns): {tagged:.2f}×" if tagged else "")
                    + f"; Commit's slow-down ÷ the storage's: {value / storage:.2f}×")
    return check


def _short(server: str) -> str:
    return server.removeprefix("fsrvpd-")


def table_rows(results: dict) -> list[list[str]]:
    """The one table: per backend, set size and operation, p50/p99 of each server and the ratios
    fsrvpd ÷ Samba; then the floors, the many-snapshots runs and the daemon's memory."""
    ours, reference = results["fsrvpd_servers"], results["reference_server"]
    rows = [["backend", "shares", "operation",
             *[f"{_short(server)} {kind}" for server in ours for kind in ("p50", "p99")], "Samba p50", "p99",
             *[f"{_short(server)} ÷ Samba" for server in ours]]]
    blank = [""] * (2 * len(ours) + 2 + len(ours))

    def row(backend: str, size: int | str, operation: str, many: bool = False) -> list[str]:
        entries = {server: _op(results, backend, server, size, operation, many) for server in (*ours, reference)}
        failed = operation in results["refused"].get(backend, {}).get(reference, [])
        return [backend, str(size), operation, *[cell for server in ours for cell in _pair(entries[server])],
                *_pair(entries[reference], failed),
                *[_times(_ratio(_p50(entries[server]), _p50(entries[reference]))) for server in ours]]

    def commit_floor_row(backend: str, size: int, label: str, floor: float | None) -> list[str]:
        return [backend, str(size), label, _ms(floor), *blank[1:2 * len(ours) + 2],
                *[_times(_ratio(_p50(_op(results, backend, server, size, COMMIT)), floor)) for server in ours]]

    for backend in results["cycles"]:
        for size in results["set_sizes"]:
            rows += [row(backend, size, operation) for operation in (*OPERATIONS, CYCLE, SETTLED, FLOOR_AFTER)]
            rows.append(commit_floor_row(backend, size, "floor: the snapshots alone (Commit ÷ floor →)",
                                         _floor(results, backend, size, "commit")))
            tagged = _floor(results, backend, size, "tagged")
            if tagged is not None:
                rows.append(commit_floor_row(backend, size, "floor: the snapshots with a tag set as they are taken "
                                             "(`zfs snapshot -o`; Commit ÷ floor →)", tagged))
            floor = cycle_floor(results, backend, size)
            if floor["total_ms"] is not None:
                rows.append([backend, str(size), f"floor: full cycle ({calls_per_cycle(size)} calls at the cheapest "
                             f"call's {floor['protocol_ms'] / calls_per_cycle(size):.1f} ms + snapshots and exposures "
                             f"{floor['storage_ms']:.0f} ms)", _ms(floor["total_ms"]), *blank[1:]])
                for server in ours:
                    tools = share_tools_ms(results, backend, server)
                    if tools:
                        rows.append([backend, str(size), f"floor {_short(server)}: + Samba's tools, {tools:.0f} ms "
                                     f"per share", _ms(cycle_floor(results, backend, size, server)["total_ms"]),
                                     *blank[1:]])
    for backend, many in results["many_snapshots"].items():
        size = many["shares"]
        for operation in (COMMIT, CYCLE, FLOOR_AFTER):
            rows.append(row(backend, size, operation, many=True))
            rows[-1][2] = f"{operation}, {many['snapshots']} snapshots on the storage"
        rows.append([backend, str(size), f"floor: the snapshots alone, {many['snapshots']} snapshots",
                     _ms(_floor(results, backend, size, "commit", many=True)), *blank[1:]])
        tagged = _floor(results, backend, size, "tagged", many=True)
        if tagged is not None:
            rows.append([backend, str(size), f"floor: the snapshots with a tag, {many['snapshots']} snapshots",
                         _ms(tagged), *blank[1:]])
    rss = results.get("rss")
    if rss:
        for sets, kib in rss["kib"].items():
            rows.append([rss["backend"], "1", f"{rss['server']} RSS, {sets} exposed sets", f"{kib / 1024:.1f} MiB",
                         *blank[1:]])
    return rows


def summary_rows(results: dict) -> list[list[str]]:
    """The short table for the README: full cycles and Commit against Samba and the floors."""
    reference = results["reference_server"]
    rows = [["backend", "shares", "server", "full cycle", "Samba", "÷ Samba", "floor", "Commit", "Samba Commit",
             "raw floor", "Commit ÷ floor"]]
    for backend in results["cycles"]:
        for size in results["set_sizes"]:
            theirs = _p50(_op(results, backend, reference, size, CYCLE))
            their_commit = _p50(_op(results, backend, reference, size, COMMIT))
            floor = _floor(results, backend, size, "commit")
            for ours in _ours(results, backend) or ["(fsrvpd: no backend yet)"]:
                mine = _p50(_op(results, backend, ours, size, CYCLE))
                commit = _p50(_op(results, backend, ours, size, COMMIT))
                rows.append([backend, str(size), ours, _ms(mine), _ms(theirs), _times(_ratio(mine, theirs)),
                             _ms(cycle_floor(results, backend, size, ours)["total_ms"]), _ms(commit), _ms(their_commit),
                             _ms(floor), _times(_ratio(commit, floor))])
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 100 else f"{value:.1f} ms"


def _pair(entry: dict | None, failed: bool = False) -> list[str]:
    if not entry:
        return ["-", "-"]
    return [_ms(entry["p50_ms"]) + (" (error)" if failed else ""), _ms(entry["p99_ms"])]


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}×" if ratio is not None else ""


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if column < 3 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "|" + "|".join("---" if column < 3 else "---:" for column in range(len(rows[0]))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def _value(check: dict) -> str:
    return "-" if check["value"] is None else f"{check['value']:.2f}"


def _target_line(check: dict) -> str:
    return (f"{check['target']}: {_value(check)} (limit {check['limit']})"
            + (f"; {check['why']}" if "why" in check else ""))


def targets_text(checks: list[dict]) -> str:
    width = max(len(check["status"]) for check in checks)
    return "\n".join(f"{check['status'].upper():{width}}  {_target_line(check)}" for check in checks)


def write(results: dict, directory: Path) -> dict[str, Path]:
    """latest.json, latest.md, latest.png in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    paths = {"json": directory / "latest.json", "markdown": directory / "latest.md", "png": directory / "latest.png"}
    paths["json"].write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    paths["markdown"].write_text(markdown(results))
    chart(results, paths["png"])
    return paths


def describe_run(results: dict) -> str:
    machine = results["machine"]
    return (f"Run {results['started_utc']} with `{results['command']}` ({results['seconds']} s) on {machine['cpu']} "
            f"({machine['cores']} cores, {machine['memory_gib']:.0f} GiB), {machine['os']}, kernel {machine['kernel']}; "
            f"load average {results['load_before']} before, {results['load_after']} after "
            "(other work shared the machine).")


def markdown(results: dict) -> str:
    lines = [describe_run(results), "", markdown_table(summary_rows(results)), "", "Targets:", ""]
    lines += [f"- {'**not met**' if check['status'] == 'not met' else check['status']}: {_target_line(check)}"
              for check in results["targets"]]
    lines += ["", "Versions: " + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
              "", f"RPC authentication: {results['rpc_auth']}; {results['limits']}."]
    if results["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    lines += ["", "Every operation (p50/p99 over the measured cycles; \"(error)\": Samba answers it with an error):",
              "", markdown_table(table_rows(results))]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    """Four panels: full cycles, Commit against the raw floor, Commit with many snapshots, RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, reference = results["fsrvpd_servers"], results["reference_server"]
    largest = max(results["set_sizes"])
    backends = list(results["cycles"])
    figure, axes = plt.subplots(2, 2, figsize=(14, 9))
    labels = [f"{backend}\n{size}" for backend in backends for size in results["set_sizes"]]
    cycles = {server: [_p50(_op(results, backend, server, size, CYCLE)) or 0 for backend in backends
                       for size in results["set_sizes"]] for server in (*ours, reference)}
    cycles["floor (calls + storage)"] = [cycle_floor(results, backend, size)["total_ms"] or 0 for backend in backends
                                         for size in results["set_sizes"]]
    _bars(axes[0][0], labels, cycles, "full cycle p50 (ms), per backend and shares", log=True)
    commits = {"raw floor": [_floor(results, backend, largest, "commit") or 0 for backend in backends]}
    commits.update({server: [_p50(_op(results, backend, server, largest, COMMIT)) or 0 for backend in backends]
                    for server in (*ours, reference)})
    _bars(axes[0][1], backends, commits, f"Commit of {largest} shares, p50 (ms)", log=True)
    many = results["many_snapshots"]
    snapshots = max((entry["snapshots"] for entry in many.values()), default=0)
    series: dict[str, list[float]] = {}
    for server in (*ours, reference):
        series[f"{server}, none"] = [_p50(_op(results, b, server, m["shares"], COMMIT)) or 0 for b, m in many.items()]
        series[f"{server}, many"] = [_p50(_op(results, b, server, m["shares"], COMMIT, many=True)) or 0
                                     for b, m in many.items()]
    series["floor, none"] = [_floor(results, b, m["shares"], "commit") or 0 for b, m in many.items()]
    series["floor, many"] = [_floor(results, b, m["shares"], "commit", many=True) or 0 for b, m in many.items()]
    _bars(axes[1][0], [f"{b}\n{m['shares']} shares" for b, m in many.items()], series,
          f"Commit p50 (ms) with no and ~{snapshots} snapshots on the storage", log=True)
    rss = results.get("rss")
    if rss:
        _bars(axes[1][1], [f"{sets} sets" for sets in rss["kib"]],
              {f"{rss['server']} RSS": [kib * 1024 / 1e6 for kib in rss["kib"].values()]}, "daemon RSS (MB)",
              limit=TARGET_RSS_MB)
    figure.suptitle(f"fsrvpd vs Samba rpcd_fsrvp — {results['started_utc']}, {results['machine']['cores']} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _bars(axis, labels: list[str], series: dict[str, list[float]], title: str, log: bool = False,
          limit: float | None = None) -> None:
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        axis.bar([index + offset * width for index in range(len(labels))], values, width, label=name)
    axis.set_xticks([index + width * (len(series) - 1) / 2 for index in range(len(labels))], labels)
    axis.set_title(title)
    if log:
        axis.set_yscale("log")
    if limit is not None:
        axis.axhline(limit, color="red", linestyle="--", label=f"limit {limit:g}")
    axis.legend(fontsize="small")
