"""`imagine`: render from the command line through the same queue and workers the Discord bot uses."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from imagine.client import EXIT_UNREACHABLE, ImagineClient, unreachable_message
from imagine.contract import MAX_PROMPT_CHARS, NO_ADAPTER, SCHEDULERS, JobRejected, default, parse_adapter_list
from imagine.settings import FrontEndSettings
from imagine.store import REDIS_UNREACHABLE
from imagine.styles import StyleBook
from imagine.wire import Cancelled, Failed, Queued, Started, Step

EXIT_FAILED, EXIT_REFUSED, EXIT_CANCELLED = 1, 2, 3


def build_parser(settings: FrontEndSettings) -> argparse.ArgumentParser:
    """Every option of the contract, with its range from the service's limits and its default from the
    contract; an option left out is left to the contract's default."""
    ranges = settings.limits.ranges()

    def span(option: str) -> str:
        low, high = ranges[option]
        return f"{low} to {high}, default {default(option)}"

    parser = argparse.ArgumentParser(
        prog="imagine", description="Render images with the Stable Diffusion workers behind the queue."
    )
    parser.add_argument("prompt", help=f"What to draw (at most {MAX_PROMPT_CHARS} characters).")
    parser.add_argument("--negative-prompt", help="What to keep out of the image.")
    parser.add_argument("--steps", type=int, help=f"Denoising steps, {span('num_inference_steps')}.")
    parser.add_argument("--guidance", type=float, help=f"Guidance scale, {span('guidance_scale')}.")
    parser.add_argument("--width", type=int, help=f"Width in pixels, {span('width')}, a multiple of 8.")
    parser.add_argument("--height", type=int, help=f"Height in pixels, {span('height')}, a multiple of 8.")
    parser.add_argument("--seed", type=int, help="Seed of the first image (random when absent).")
    parser.add_argument("--count", type=int, help=f"Number of images, {span('num_images_per_prompt')}.")
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="NAME[:SCALE]",
        help=f"LoRA adapter, at a scale ({span('adapter_scale')}); give it again to blend several "
        f"(at most {settings.max_adapters}). Default: the workers' DEFAULT_ADAPTER; '{NO_ADAPTER}': the base model.",
    )
    parser.add_argument("--adapter-scale", type=float, help=f"Adapter strength, {span('adapter_scale')}.")
    parser.add_argument(
        "--init-image",
        type=Path,
        metavar="PATH",
        help="Start from this image (PNG, JPEG or WebP; img2img). Without --width and --height it renders "
        "at the image's aspect ratio, at about 512² pixels.",
    )
    parser.add_argument(
        "--strength",
        type=float,
        help=f"How far to move from --init-image: {span('strength')} (low stays close to it).",
    )
    parser.add_argument(
        "--style", help="A style of STYLES_FILE: its template around the prompt, its defaults (imagine-admin styles)."
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, help=f"Sampler, default {default('scheduler')}.")
    parser.add_argument("--out", type=Path, default=Path("out"), help="Folder for the PNGs and the metadata JSON.")
    return parser


# The contract's name of each option the parser takes under another name.
OPTION_NAMES = {
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "count": "num_images_per_prompt",
}


def main(argv: list[str] | None = None) -> int:
    settings = FrontEndSettings()
    args = build_parser(settings).parse_args(argv)
    try:
        return render(settings, args)
    except REDIS_UNREACHABLE as error:
        print(f"imagine: {unreachable_message(settings, error)}", file=sys.stderr)
        return EXIT_UNREACHABLE


def render(settings: FrontEndSettings, args: argparse.Namespace) -> int:
    given = {name: value for name, value in vars(args).items() if name != "out" and value is not None}
    options = {OPTION_NAMES.get(name, name): value for name, value in given.items()}
    chosen = options.pop("adapter", [])
    if "init_image" in options:
        path = options.pop("init_image")
        try:
            options["image"] = path.read_bytes()
        except OSError as error:
            print(f"imagine: refused: cannot read --init-image {path}: {error.strerror}", file=sys.stderr)
            return EXIT_REFUSED
    client = ImagineClient(settings, client_name="cli")
    try:
        if len(chosen) == 1 and ":" not in chosen[0]:
            options["adapter"] = chosen[0]  # one adapter, at --adapter-scale
        elif chosen:
            options["adapters"] = parse_adapter_list(",".join(chosen))
        job = client.submit(StyleBook(settings.styles_file, settings.limits).apply(options))
    except JobRejected as error:
        print(f"imagine: refused: {error}", file=sys.stderr)
        return EXIT_REFUSED
    wait_s = client.queue_stats().estimated_wait_s(job.position)
    estimate = f" (about {wait_s:.0f} s)" if wait_s is not None else ""
    print(f"job {job.job_id}: queued at position {job.position}{estimate}, seed {job.options.seed}", file=sys.stderr)

    bar = None
    try:
        for event in client.events(job.job_id):
            match event:
                case Queued(message=str(message)):
                    print(f"job {job.job_id}: {message}", file=sys.stderr)
                case Started():
                    print(f"job {job.job_id}: started on {event.worker}", file=sys.stderr)
                    for warning in event.warnings:
                        print(f"warning: {warning}", file=sys.stderr)
                    bar = tqdm(desc="rendering", unit="step", file=sys.stderr)
                case Step() if bar is not None:
                    bar.total = event.total
                    bar.update(event.step - bar.n)
                case Failed():
                    print(f"imagine: job failed: {event.message}", file=sys.stderr)
                    return EXIT_FAILED
                case Cancelled():
                    print(f"imagine: job cancelled: {event.message}", file=sys.stderr)
                    return EXIT_CANCELLED
    except KeyboardInterrupt:
        print(f"\nimagine: {client.cancel(job.job_id)} job {job.job_id}", file=sys.stderr)
        return EXIT_CANCELLED
    except LookupError as error:
        print(
            f"imagine: {error} (Redis restarted without its data, or it outlived RESULT_TTL_S); submit it again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except REDIS_UNREACHABLE as error:
        print(f"imagine: job {job.job_id} was queued, then Redis went away: {error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        if bar is not None:
            bar.close()

    result = client.result(job.job_id)
    if result is None:
        print(f"imagine: job {job.job_id} finished but its result has expired", file=sys.stderr)
        return EXIT_FAILED
    args.out.mkdir(parents=True, exist_ok=True)
    for image, png in result.delivered_images():
        path = args.out / result.file_name(image)
        path.write_bytes(png)
        image.file = path.name
        print(path)
    (args.out / f"{job.job_id}.json").write_text(result.meta.model_dump_json(exclude_unset=True, indent=2))
    for warning in result.meta.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    client.confirm_delivery(job.job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
