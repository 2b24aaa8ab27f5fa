"""`imagine-admin`: reload adapters on every worker, list adapters, and look at the queue."""

from __future__ import annotations

import argparse
import sys
import time

from imagine.client import ImagineClient, ReloadOutcome
from imagine.settings import ServiceSettings


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_reload(outcome: ReloadOutcome) -> str:
    rows = []
    for worker, answers in sorted(outcome.answers.items()):
        for answer in answers:
            status = "ok" if answer["ok"] else f"REFUSED: {answer['error']}"
            rows.append([worker, answer["adapter"], answer.get("version") or "-", f"{answer['seconds']:.3f}s", status])
    for worker in outcome.waiting_for:
        rows.append([worker, "-", "-", "-", "busy: reloads before its next job"])
    if not rows:
        return "no worker is online; workers load the current adapters when they start"
    return _table(rows, ["worker", "adapter", "version", "time", "result"])


def format_adapters(client: ImagineClient) -> str:
    rows = []
    for worker, status in sorted(client.workers().items()):
        default = status.get("default_adapter")
        for name, adapter in sorted(status["adapters"].items()):
            marker = " (default)" if name == default else ""
            rows.append([worker, name + marker, adapter["version"], adapter["layout"], "ok"])
        for name, error in sorted(status.get("adapter_errors", {}).items()):
            if name not in status["adapters"]:
                rows.append([worker, name, "-", "-", f"REFUSED: {error}"])
    if not rows:
        return "no adapters loaded (or no worker online)"
    return _table(rows, ["worker", "adapter", "version", "layout", "state"])


def format_queue(client: ImagineClient) -> str:
    stats = client.queue_stats()
    average = f"{stats.recent_render_s:.2f} s" if stats.recent_render_s is not None else "no job finished yet"
    lines = [
        f"queued:          {stats.queued}",
        f"running:         {len(stats.running)}",
        f"workers online:  {len(stats.workers)}",
        f"recent render:   {average}",
    ]
    for name, status in sorted(stats.workers.items()):
        busy = f"busy with {status['current_job']}" if status.get("current_job") else "idle"
        lines.append(f"  {name}: {busy}, {status['jobs_done']} jobs done, {status['device']}, {status['base_model']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagine-admin", description="Administer the image service's workers.")
    commands = parser.add_subparsers(dest="command", required=True)
    reload_parser = commands.add_parser("reload-adapter", help="Hot-reload an adapter (or all) on every worker.")
    reload_parser.add_argument("name", nargs="?", default=None, help="Adapter to reload; all adapters when absent.")
    reload_parser.add_argument("--timeout", type=float, default=30.0, help="Seconds to wait for the workers' answers.")
    commands.add_parser("adapters", help="The adapters each worker has loaded, with their versions.")
    commands.add_parser("queue", help="Queue depth, running jobs, workers online, recent render time.")
    args = parser.parse_args(argv)

    client = ImagineClient(ServiceSettings())
    if args.command == "reload-adapter":
        started = time.monotonic()
        outcome = client.reload_adapters(args.name, timeout_s=args.timeout)
        print(format_reload(outcome))
        print(f"({time.monotonic() - started:.2f} s)")
        refused = any(not answer["ok"] for answers in outcome.answers.values() for answer in answers)
        return 1 if refused or not outcome.answers else 0
    if args.command == "adapters":
        print(format_adapters(client))
    else:
        print(format_queue(client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
