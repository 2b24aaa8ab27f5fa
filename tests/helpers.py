"""Real processes and real files for the tests: a redis-server, Celery workers, LoRA files on disk."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

from imagine.settings import FrontEndSettings, ServiceSettings
from imagine.store import JobStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A redis-server of the tests' own on a free port, which a test may stop and start again."""

    def __init__(self, workdir: Path, persistent: bool = False, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        # Compose's Redis keeps an append-only file too, so its data survives a restart. Here each write is
        # on disk before it is answered, so a killed server comes back with everything it said yes to.
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        password = ["--requirepass", self.password] if self.password else []
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self.persistence,
                *password,
            ],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, password=self.password)
        wait_for(lambda: _pings(client), 10, "redis-server to start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def crash(self) -> None:
        """SIGKILL: the server gets no chance to save or to close its clients' connections politely."""
        self.process.kill()
        self.process.wait(10)
        self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def service_settings(redis_url: str, namespace: str, **overrides) -> FrontEndSettings:
    """Settings of one isolated service (as its front ends read them): its own queue and keys in the shared
    test Redis."""
    return FrontEndSettings(
        _env_file=None,
        redis_url=redis_url,
        queue_name=namespace,
        key_prefix=namespace,
        worker_heartbeat_s=0.5,
        worker_dead_after_s=3.0,
        **overrides,
    )


def service_env(settings: FrontEndSettings) -> dict[str, str]:
    """The environment a process of the service of `settings` gets (a worker, a CLI)."""
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "QUEUE_NAME": settings.queue_name,
        "KEY_PREFIX": settings.key_prefix,
        "MAX_QUEUE_LENGTH": str(settings.max_queue_length),
        "STYLES_FILE": str(settings.styles_file),
    }


def run_cli(settings: FrontEndSettings, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one of the console scripts (`imagine`, `imagine-admin`) as a user would."""
    return subprocess.run(
        [str(BIN / program), *args],
        env=service_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ServiceProcess:
    """One of the service's processes, started as an operator starts it, with its log in a file."""

    command: list[str]
    label: str

    def __init__(self, settings: ServiceSettings, name: str, log_dir: Path, env: dict[str, str]) -> None:
        self.settings = settings
        self.name = name
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self.env = {**service_env(settings), "PYTHONUNBUFFERED": "1", **env}
        self.process: subprocess.Popen | None = None

    def start(self, wait: bool = True):
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=self.prepare_child,
        )
        if wait:
            wait_for(self._ready_or_dead, 120, f"{self.label} {self.name} to be ready")
        return self

    def prepare_child(self) -> None:
        """Runs in the child before it starts."""

    def is_ready(self) -> bool:
        raise NotImplementedError

    def _ready_or_dead(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.label} {self.name} exited ({self.process.returncode}):\n{self.log()}")
        return self.is_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class WorkerProcess(ServiceProcess):
    """`celery -A worker worker`."""

    label = "worker"

    def __init__(
        self, settings: ServiceSettings, name: str, log_dir: Path, memory_limit: int | None = None, **env: str
    ) -> None:
        defaults = {
            "WORKER_HEARTBEAT_S": str(settings.worker_heartbeat_s),
            "WORKER_DEAD_AFTER_S": str(settings.worker_dead_after_s),
            "MAX_JOB_ATTEMPTS": str(settings.max_job_attempts),
            "WARMUP_STEPS": "1",
            "PROGRESS_INTERVAL_S": "0",
            "PREVIEW_INTERVAL_S": "0",
        }
        super().__init__(settings, f"{name}@test", log_dir, {**defaults, **env})
        self.memory_limit = memory_limit
        self.command = [
            str(BIN / "celery"),
            "-A",
            "worker",
            "worker",
            "-n",
            self.name,
            "-l",
            "info",
            "--without-mingle",
            "--without-gossip",
        ]
        self._store = JobStore.from_url(settings.redis_url, settings.key_prefix, 60)

    def prepare_child(self) -> None:
        if self.memory_limit:
            # A ceiling on the address space makes a too-large allocation fail the way a full GPU does.
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (self.memory_limit, self.memory_limit))

    def start(self, wait: bool = True):
        self._started_at = self._store.now()
        return super().start(wait)

    def is_ready(self) -> bool:
        """This process's own heartbeat is in Redis (not the last one of a process killed a moment ago)."""
        status = self._store.workers(alive_within_s=5).get(self.name)
        return status is not None and status.heartbeat_at > self._started_at


BUSY = {"prompt": "keeps the worker busy", "width": 512, "height": 512, "num_inference_steps": 60, "adapter": "none"}
"""A job long enough on the tiny model that what is queued behind it waits; cancel it to let them run."""


def occupy_worker(settings: ServiceSettings) -> str:
    """Submit BUSY and wait until a worker renders it; its job id."""
    from imagine.client import ImagineClient

    client = ImagineClient(settings)
    job = client.submit(BUSY)
    wait_for(lambda: client.job(job.job_id).state == "running", 30, "the worker to be busy")
    return job.job_id


def free_worker(settings: ServiceSettings, job_id: str) -> None:
    """Cancel the busy job and wait until it has ended."""
    from imagine.client import ImagineClient

    client = ImagineClient(settings)
    client.cancel(job_id)
    wait_for(lambda: client.job(job_id).state in ("done", "cancelled", "failed"), 60, "the busy job to end")


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def pixels(data: bytes) -> bytes:
    """The decoded RGB pixels of a PNG, to compare images whatever their text chunks say."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB").tobytes()


def photo(width: int, height: int, format: str = "PNG", **save_options) -> bytes:
    """A picture with structure in it (gradients and a disc), as a file of `format`, to start img2img from."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 240, 40))
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_options)
    return buffer.getvalue()


def nearly_the_same(first: bytes, second: bytes, max_share: float = 0.05) -> bool:
    """Two PNGs are the same image but for rounding: no value more than one level off, and few off at all.
    A batched render, or an adapter fused into the weights, is not bit-identical to the same render alone
    or unfused (kernels and sums are ordered differently, and the tests' adapters, far stronger than trained
    ones, carry the difference further with every step); anything else shows as far larger differences."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(first)) as a, Image.open(io.BytesIO(second)) as b:
        a_pixels, b_pixels = np.asarray(a.convert("RGB"), np.int16), np.asarray(b.convert("RGB"), np.int16)
    if a_pixels.shape != b_pixels.shape:
        return False
    differences = np.abs(a_pixels - b_pixels)
    return int(differences.max()) <= 1 and float((differences > 0).mean()) <= max_share


# LoRA files --------------------------------------------------------------------------------------

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora_state(
    unet, seed: int, rank: int = 4, alpha: float = 4.0, std: float = 0.3, use_dora=False, targets=TARGET_MODULES
):
    """A PeftModel around `unet` with seeded, non-zero LoRA weights (a trained adapter stand-in; the default
    `std` is far larger than a trained adapter's, so that its images differ visibly from the base model's).
    DoRA's magnitudes start as peft sets them (the base weights' norms) and move by a few percent."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_dora=use_dora)
    model = get_peft_model(unet, config)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_magnitude_vector" in name:
            parameter.data *= 1 + torch.randn(parameter.shape, generator=generator) * 0.05
        elif "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * std
    return model


def rewrite_adapter(folder: Path, layout: str, peft_model) -> Path:
    """Replace what an adapter's name holds (a folder or a kohya file) by `peft_model`'s LoRA in `layout`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.with_suffix(".safetensors").unlink(missing_ok=True)
    return write_adapter(folder, layout, peft_model)


def write_adapter(folder: Path, layout: str, peft_model) -> Path:
    """Write `peft_model`'s LoRA in one of the three layouts; returns the adapter's path in LORA_DIR."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if layout == "peft":
        peft_model.save_pretrained(folder)
        return folder
    config = peft_model.peft_config["default"]
    scaling = config.lora_alpha / config.r
    state = {}
    for key, tensor in get_peft_model_state_dict(peft_model).items():
        key = key.removeprefix("base_model.model.")
        state[key] = tensor * scaling if ".lora_B." in key else tensor
    if layout == "diffusers":
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state)
        return folder
    if layout == "kohya":
        path = folder.with_suffix(".safetensors")
        shutil.rmtree(folder)
        save_file(convert_state_dict_to_kohya({f"unet.{key}": tensor for key, tensor in state.items()}), path)
        return path
    raise ValueError(layout)
