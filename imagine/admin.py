"""`imagine-admin`: reload adapters on every worker, list adapters, look at the queue, serve metrics."""

from __future__ import annotations

import argparse
import sys
import time

from imagine.client import EXIT_UNREACHABLE, ImagineClient, ReloadOutcome, unreachable_message
from imagine.settings import FrontEndSettings
from imagine.store import DEAD_LETTERS_KEPT, REDIS_UNREACHABLE, DurationStats
from imagine.styles import StyleBook


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
            status = "ok" if answer.ok else f"REFUSED: {answer.error}"
            rows.append([worker, answer.adapter, answer.version or "-", f"{answer.seconds:.3f}s", status])
    for worker in outcome.waiting_for:
        rows.append([worker, "-", "-", "-", "busy: reloads before its next job"])
    if not rows:
        return "no worker is online; workers load the current adapters when they start"
    return _table(rows, ["worker", "adapter", "version", "time", "result"])


def format_adapters(client: ImagineClient) -> str:
    rows = []
    for worker, status in sorted(client.workers().items()):
        errors = status.adapter_errors
        for name, adapter in sorted(status.adapters.items()):
            marker = " (default)" if name == status.default_adapter else ""
            # A refused reload leaves the previous version serving: both are worth seeing.
            state = f"serving; its new files were REFUSED: {errors[name]}" if name in errors else "ok"
            rows.append([worker, name + marker, adapter.version, adapter.layout, adapter.file, state])
        for name, error in sorted(errors.items()):
            if name not in status.adapters:
                rows.append([worker, name, "-", "-", "-", f"REFUSED: {error}"])
    if not rows:
        return "no adapters loaded (or no worker online)"
    return _table(rows, ["worker", "adapter", "version", "layout", "file", "state"])


def _by_label(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} {count}" for label, count in sorted(counts.items()) if count)


def _recent(stats: DurationStats, summary: str) -> str:
    value = stats.recent_mean if summary == "mean" else stats.recent_median
    if value is None:
        return "no job yet"
    jobs = len(stats.recent)
    return f"{value:.2f} s ({summary} of the last {jobs} job{'' if jobs == 1 else 's'})"


def format_queue(client: ImagineClient) -> str:
    """The queue, the workers and the counts, as `/queue` and `imagine-admin queue` show them; the same
    numbers as the Prometheus exporter's (`imagine-admin metrics`)."""
    stats = client.queue_stats()
    counters = stats.counters
    failed_total = sum(counters.failures.values())
    failed_last_hour = sum(stats.failures_last_hour.values())
    loads = counters.adapter_loads
    refused = sum(counters.dead_letters.values())
    lines = [
        f"queued:          {stats.queued}",
        f"running:         {len(stats.running)}",
        f"workers online:  {len(stats.workers)}",
        f"recent render:   {_recent(stats.render, 'mean')}",
        f"recent wait:     {_recent(stats.queue_wait, 'median')}",
        f"jobs done:       {stats.render.count}",
        f"failed:          {failed_last_hour} in the last hour"
        + (f" ({_by_label(stats.failures_last_hour)})" if failed_last_hour else "")
        + f", {failed_total} in all"
        + (f" ({_by_label(counters.failures)})" if failed_total else ""),
        f"cancelled:       {counters.cancelled}",
        f"adapter loads:   {loads['loaded']} loaded, {loads['unchanged']} unchanged, {loads['failed']} failed",
        f"dead letters:    {refused}"
        + (f" ({_by_label(counters.dead_letters)}; see imagine-admin dead-letters)" if refused else ""),
    ]
    if counters.uncompiled_renders:
        lines.append(
            f"uncompiled:      {counters.uncompiled_renders} batches at eager speed on compiled workers "
            "(shapes their warm-up did not compile: see their log)"
        )
    for letter in stats.dead_letters[:3]:
        lines.append(f"  refused {_when(letter.at)}: {letter.kind}: {letter.reason}")
    for name, status in sorted(stats.workers.items()):
        rendering = status.current_jobs or ([status.current_job] if status.current_job else [])
        busy = f"busy with {', '.join(rendering)}" if rendering else "idle"
        lines.append(f"  {name}: {busy}, {status.jobs_done} jobs done, {status.device}, {status.base_model}")
    return "\n".join(lines)


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_dead_letters(client: ImagineClient, with_messages: bool) -> str:
    """The queue messages workers refused, newest first: when, which worker, why, and the message itself."""
    letters = client.store.dead_letters()
    if not letters:
        return "no refused messages"
    lines = []
    for letter in letters:
        lines.append(
            f"{_when(letter.at)}  {letter.worker}  {letter.kind}  task {letter.task_id or '-'}  "
            f"{letter.bytes} bytes: {letter.reason}"
        )
        if with_messages:
            lines.append(f"    {letter.message}")
    return "\n".join(lines)


def format_styles(book: StyleBook) -> str:
    """The styles of STYLES_FILE as front ends offer them, and what is wrong with the file if anything is."""
    styles = book.styles()
    lines = [
        f"{style.name}: {style.prompt}"
        + (f" (negative: {style.negative_prompt})" if style.negative_prompt else "")
        + (
            f"; defaults {', '.join(f'{key}={value}' for key, value in style.defaults.items())}"
            if style.defaults
            else ""
        )
        for style in styles.values()
    ]
    if not lines:
        lines.append(f"no styles ({book.path} {'has none' if book.path.exists() else 'does not exist'})")
    if book.error is not None:
        lines.append(f"ERROR: {book.error}; front ends keep the styles they read before it until it is fixed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imagine-admin", description="Administer the image service's workers.")
    commands = parser.add_subparsers(dest="command", required=True)
    reload_parser = commands.add_parser("reload-adapter", help="Hot-reload an adapter (or all) on every worker.")
    reload_parser.add_argument("name", nargs="?", default=None, help="Adapter to reload; all adapters when absent.")
    reload_parser.add_argument("--timeout", type=float, default=30.0, help="Seconds to wait for the workers' answers.")
    commands.add_parser("adapters", help="The adapters each worker has loaded, with their versions.")
    commands.add_parser(
        "queue", help="Queue depth, running jobs, workers, render and wait times, failures, adapter loads."
    )
    commands.add_parser("styles", help="The styles of STYLES_FILE, and what is wrong with the file if anything is.")
    letters_parser = commands.add_parser(
        "dead-letters", help=f"The last {DEAD_LETTERS_KEPT} queue messages workers refused as not a job of ours."
    )
    letters_parser.add_argument(
        "--messages", action="store_true", help="Show each message as it was on the queue (it may hold a prompt)."
    )
    metrics_parser = commands.add_parser(
        "metrics", help="Serve the same numbers as `queue` for Prometheus, at http://ADDRESS:PORT/metrics."
    )
    metrics_parser.add_argument("--port", type=int, default=9808, help="Port to serve on.")
    metrics_parser.add_argument("--address", default="0.0.0.0", help="Address to listen on.")
    args = parser.parse_args(argv)

    settings = FrontEndSettings()
    try:
        return run_command(args, ImagineClient(settings), parser)
    except REDIS_UNREACHABLE as error:
        print(f"imagine-admin: {unreachable_message(settings, error)}", file=sys.stderr)
        return EXIT_UNREACHABLE


def run_command(args: argparse.Namespace, client: ImagineClient, parser: argparse.ArgumentParser) -> int:
    if args.command == "reload-adapter":
        started = time.monotonic()
        outcome = client.reload_adapters(args.name, timeout_s=args.timeout)
        print(format_reload(outcome))
        print(f"({time.monotonic() - started:.2f} s)")
        refused = any(not answer.ok for answers in outcome.answers.values() for answer in answers)
        return 1 if refused or not outcome.answers else 0
    if args.command == "adapters":
        print(format_adapters(client))
    elif args.command == "styles":
        book = StyleBook(client.settings.styles_file, client.settings.limits)  # a FrontEndSettings
        print(format_styles(book))
        return 1 if book.error is not None else 0
    elif args.command == "dead-letters":
        print(format_dead_letters(client, args.messages))
    elif args.command == "metrics":
        try:
            from imagine.metrics import serve_metrics
        except ModuleNotFoundError as missing:
            parser.error(f"the exporter needs {missing.name}: pip install 'imagine-service[monitor]'")
        print(f"serving metrics on http://{args.address}:{args.port}/metrics", file=sys.stderr, flush=True)
        serve_metrics(client, args.port, args.address)
    else:
        print(format_queue(client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
