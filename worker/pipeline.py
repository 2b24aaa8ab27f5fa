"""Loading the base Stable Diffusion pipeline: a hub id, a local diffusers folder, or the built-in `tiny`.

The built-in models are pipelines of SD v1-4's classes with seeded random weights: `tiny` (small
dimensions, for tests and offline demos) and `random-sd-v1-4` (SD v1-4's dimensions, for benchmarks).
Each is built once, saved with `save_pretrained` and loaded back through `from_pretrained`, the path
a real model takes, so demos and tests run offline and exercise the real loading code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomPipelineSpec:
    """Dimensions of a built-in pipeline of SD v1-4's classes with seeded random weights."""

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    attention_head_dim: int
    unet_norm_groups: int
    text_hidden_size: int
    text_layers: int
    text_heads: int
    text_intermediate_size: int
    text_vocab_size: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    seed: int = 0


BUILT_IN_MODELS = {
    # For tests and offline demos: renders noise in milliseconds.
    "tiny": RandomPipelineSpec(
        unet_channels=(32, 64),
        unet_layers_per_block=1,
        attention_head_dim=8,
        unet_norm_groups=16,
        text_hidden_size=32,
        text_layers=2,
        text_heads=4,
        text_intermediate_size=37,
        text_vocab_size=514,
        vae_channels=(16, 16, 32, 32),
        vae_layers_per_block=1,
        vae_norm_groups=8,
    ),
    # SD v1-4's architecture (its config files' dimensions) with random weights: real compute and memory
    # for benchmarks without downloading the weights.
    "random-sd-v1-4": RandomPipelineSpec(
        unet_channels=(320, 640, 1280, 1280),
        unet_layers_per_block=2,
        attention_head_dim=8,
        unet_norm_groups=32,
        text_hidden_size=768,
        text_layers=12,
        text_heads=12,
        text_intermediate_size=3072,
        text_vocab_size=49408,
        vae_channels=(128, 256, 512, 512),
        vae_layers_per_block=2,
        vae_norm_groups=32,
    ),
}
BUILT_IN_FORMAT_VERSION = 1
"""Bumped whenever a built-in model's construction changes, so an old saved copy is rebuilt."""


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def choose_placement(device: str, dtype: str) -> Placement:
    """`auto` means CUDA in fp16 when a GPU is present, else CPU in fp32 (fp16 on CPU is slow or broken)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={device} but no CUDA GPU is visible; set DEVICE=cpu or DEVICE=auto.")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return Placement(torch.device(device), getattr(torch, dtype))


def _byte_level_vocabulary() -> dict[str, int]:
    # CLIP's tokenizer maps bytes to printable characters and marks a word's last symbol with </w>;
    # without merges, every byte is a token, which is all a random-weight model needs.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in printable]
    symbols += [chr(256 + n) for n in range(256 - len(printable))]
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocabulary[symbol] = len(vocabulary)
    for symbol in symbols:
        vocabulary[symbol + "</w>"] = len(vocabulary)
    return vocabulary


def build_random_pipeline(spec: RandomPipelineSpec):
    """A StableDiffusionPipeline of SD v1-4's classes with the spec's dimensions and seeded random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(spec.seed)
    cross_attention_blocks = len(spec.unet_channels) - 1
    unet = UNet2DConditionModel(
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.unet_layers_per_block,
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * cross_attention_blocks + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * cross_attention_blocks,
        cross_attention_dim=spec.text_hidden_size,
        attention_head_dim=spec.attention_head_dim,
        norm_num_groups=spec.unet_norm_groups,
    )
    vae = AutoencoderKL(
        block_out_channels=spec.vae_channels,
        layers_per_block=spec.vae_layers_per_block,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        norm_num_groups=spec.vae_norm_groups,
        sample_size=512,
    )
    # Same schedule as SD v1-4's scheduler_config.json.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=spec.text_hidden_size,
            intermediate_size=spec.text_intermediate_size,
            num_attention_heads=spec.text_heads,
            num_hidden_layers=spec.text_layers,
            vocab_size=spec.text_vocab_size,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(_byte_level_vocabulary()))
        merges_file.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=77)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_built_in_model(name: str, cache_dir: Path) -> Path:
    """The saved folder of built-in model `name`, built and written atomically on first use."""
    folder = cache_dir / f"{name}-v{BUILT_IN_FORMAT_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        build_random_pipeline(BUILT_IN_MODELS[name]).save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_base_model(base_model: str, cache_dir: Path) -> str:
    """The folder or hub id `from_pretrained` should load."""
    if base_model in BUILT_IN_MODELS:
        return str(ensure_built_in_model(base_model, cache_dir))
    path = Path(base_model).expanduser()
    if path.exists() or base_model.startswith((".", "/", "~")):
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"BASE_MODEL={base_model} is not a diffusers pipeline folder (no model_index.json in it). "
                "Point it at a folder written by save_pretrained or downloaded from the hub."
            )
        return str(path)
    return base_model


def load_pipeline(base_model: str, placement: Placement, cache_dir: Path, safety_checker: bool):
    """Load the pipeline once, on its device. The safety checker follows the model folder unless disabled."""
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(base_model, cache_dir)
    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, dtype=placement.dtype, **extra)
    except (OSError, ValueError) as error:
        if os.path.isdir(source):
            raise ModelLoadError(f"Could not load the base model from {source}: {error}") from error
        raise ModelLoadError(
            f"Could not load the base model '{base_model}' from the Hugging Face Hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Without hub access, download it where the hub "
            f"is reachable (`hf download {base_model} --local-dir sd-v1-4`), copy the folder here "
            "and set BASE_MODEL to that folder; or set BASE_MODEL=tiny for the offline demo model."
        ) from error
    pipe = pipe.to(placement.device)
    if placement.device.type == "cuda":
        # Convolutions in NHWC, the layout tensor cores read without a transpose.
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    logger.info(
        "loaded base model %s on %s (%s), safety checker %s",
        base_model,
        placement.device,
        placement.dtype,
        "on" if pipe.safety_checker is not None else "off",
    )
    return pipe


class UncompiledCalls:
    """Counts the calls of the compiled modules that ran uncompiled. Under `serve_compiled_shapes_only`, a
    call whose shapes no compiled graph covers runs eagerly, and torch says nothing of it: the count is how
    the worker tells an operator that some jobs render at eager speed (and which shapes to warm up)."""

    def __init__(self) -> None:
        self.count = 0

    def counted(self, forward: Callable) -> Callable:
        """The forward, counting its uncompiled calls once compiled. Not a forward hook: dynamo compiles a hook
        as a frame of its own, whose guards pass whatever shapes the forward gets."""

        @functools.wraps(forward)
        def counted_forward(*args, **kwargs):
            # While dynamo traces the forward, `is_compiling()` is True and the branch leaves nothing in the
            # graph: only a call that runs the module's Python code, uncompiled, counts.
            if not torch.compiler.is_compiling():
                self.count += 1
            return forward(*args, **kwargs)

        # Dynamo keeps its graphs, and counts them against its recompile limit, per code object: each module
        # gets a code object of its own, as its own forward had, so that the UNet's graphs and the decoder's
        # are not counted together.
        counted_forward.__code__ = counted_forward.__code__.replace()
        return counted_forward


class TimestepOnDevice:
    """The UNet's forward, given its timestep as a float on the sample's device by a copy that does not wait
    for the GPU, whatever the scheduler's dtype and device.

    The schedulers keep their timesteps on the CPU (`with_timesteps_on_cpu`), and the UNet moves its timestep
    to the sample's device as its first step: with `.to(device)`, whose copy from the CPU ends in a stream
    sync, once per step. Here the copy says `non_blocking` (from pageable memory, CUDA stages the few bytes
    at once), and a compiled UNet sees the same input whichever scheduler runs: dynamo guards on dtypes, and
    the Euler schedulers' float timesteps would otherwise miss every graph the warm-up compiled with the
    default scheduler's integers; a CPU input would keep inductor from CUDA graphs. The UNet makes its
    timestep a float on the sample's device before anything else uses it, so the result is the same
    (timesteps up to 1000 are exact floats)."""

    def __init__(self, forward: Callable) -> None:
        self.forward = forward

    def __call__(self, sample: torch.Tensor, timestep, *args, **kwargs):
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.float().to(sample.device, non_blocking=True)
        return self.forward(sample, timestep, *args, **kwargs)

    @classmethod
    def install(cls, unet: torch.nn.Module) -> TimestepOnDevice:
        """Wrap the UNet's forward, once."""
        if not isinstance(unet.forward, cls):
            unet.forward = cls(unet.forward)
        return unet.forward


def compile_pipeline(pipe, backend: str, mode: str | None, graphs: int = 0) -> UncompiledCalls:
    """torch.compile the forward of the UNet and of the VAE's decoder in place (the module objects stay:
    adapters, fusing and hot-swapping reach the same layers). Call it after `pipe.enable_lora_hotswap` and
    the first adapter's load, so that later reloads and switches swap tensors in place without recompiling
    (an adapter loaded later than that renders uncompiled: peft sees no compiled module to refuse, since the
    forwards are compiled, not the modules). `graphs`: how many the warm-up may compile of each (one per
    adapter path, image count and size): past dynamo's limit (8) it would stop compiling and render the rest
    eagerly. Returns the count of their uncompiled calls."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs)
    options = {"backend": backend, **({"mode": mode} if mode else {})}
    uncompiled = UncompiledCalls()
    # What TimestepOnDevice calls is compiled, not TimestepOnDevice: its cast comes before dynamo's guards.
    unet_forward = TimestepOnDevice.install(pipe.unet)
    unet_forward.forward = torch.compile(uncompiled.counted(unet_forward.forward), **options)
    pipe.vae.decoder.forward = torch.compile(uncompiled.counted(pipe.vae.decoder.forward), **options)
    logger.info("compiled the UNet and the VAE decoder (%s)", ", ".join(f"{k}={v}" for k, v in options.items()))
    return uncompiled


def serve_compiled_shapes_only() -> None:
    """After the warm-up: a job whose shapes no compiled graph covers runs the model uncompiled instead of
    compiling under the user's job (torch.compiler's `eager_on_recompile` stance). Dynamo guards on shapes:
    a new size, image count or prompt length would otherwise compile again, for up to a minute on a GPU,
    and its automatic dynamic shapes generalise to some neighbours, not to every one (seen on the tiny
    model: a job of 4 images after batches of 1 and 8 compiled again, and so did an odd latent side and
    one image without guidance). `UncompiledCalls` counts them."""
    torch.compiler.set_stance("eager_on_recompile")
