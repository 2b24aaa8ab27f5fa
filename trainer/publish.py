"""Publishing a trained adapter into LORA_DIR, and telling the workers.

The adapter is written beside LORA_DIR's entries under a hidden name (workers ignore hidden entries),
then swapped into place in one step, so a worker reloading meanwhile sees the old adapter or the new
one, never half of one; it is readable by workers running as another user (containers). Beside the
weights go the model card, the training config, the metrics and the held-out captions that
`python -m trainer eval` scores on.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.data import SkipReport

if TYPE_CHECKING:
    from trainer.train import TrainConfig

HELD_OUT = "held_out.json"
"""The held-out images' names and captions, published with the adapter for `python -m trainer eval`."""
VALIDATION_GRID = "validation.png"
EVALUATION_HEADING = "## Evaluation"
"""The model card's last section, rewritten by `python -m trainer eval`."""


def kohya_file_name(adapter: str) -> str:
    """The single file for A1111 and ComfyUI, named after the adapter: their `<lora:NAME:1>` is its name."""
    return f"{adapter}.safetensors"


@dataclass
class TrainedAdapter:
    """What a run trained: the UNet's LoRA (PEFT keys and config) and, if trained, the text encoder's."""

    unet_state: dict
    unet_config: object
    text_encoder_state: dict | None
    text_encoder_config: object | None
    parameters: int


def publish(
    config: TrainConfig,
    trained: TrainedAdapter,
    final_loss: float,
    steps: int,
    work: Path,
    report: SkipReport,
    validation_grid: Path | None,
) -> Path:
    """Write the adapter beside LORA_DIR's entries under a hidden name, then swap it into place
    (`replace_folder`): a worker reloading meanwhile sees the old adapter or the new one, never half of one."""
    from worker.adapters import save_adapter

    staging = Path(tempfile.mkdtemp(prefix=f".{config.output.name}.", dir=config.output.parent))
    save_adapter(
        staging,
        trained.unet_state,
        trained.unet_config,
        kohya_file=kohya_file_name(config.output.name),
        text_encoder_state=trained.text_encoder_state,
        text_encoder_config=trained.text_encoder_config,
    )
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in asdict(config).items()}
    (staging / "training_config.json").write_text(json.dumps(settings, indent=2))
    shutil.copy(work / "metrics.jsonl", staging / "metrics.jsonl")
    shutil.copy(work / "summary.json", staging / "summary.json")
    shutil.copy(work / HELD_OUT, staging / HELD_OUT)
    if validation_grid is not None:
        shutil.copy(validation_grid, staging / VALIDATION_GRID)
    crop = "centre" if config.center_crop else "random"
    lora_config = trained.unet_config
    network = "DoRA (weight-decomposed LoRA)" if lora_config.use_dora else "LoRA"
    targets = ", ".join(sorted(lora_config.target_modules))
    text_encoder = (
        f"; and on the text encoder's {', '.join(sorted(trained.text_encoder_config.target_modules))} "
        f"(learning rate {config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr})"
        if trained.text_encoder_config is not None
        else "; the text encoder is not adapted"
    )
    images = (
        f"aspect-ratio buckets of about {config.resolution}² px (sides in multiples of {config.bucket_step})"
        if config.buckets
        else f"resolution {config.resolution}, {crop} crop"
    )
    card = [
        f"# LoRA adapter `{config.output.name}`",
        "",
        f"- base model: `{config.base_model}`",
        f"- data: `{config.data}` ({report.summary()})",
        f"- steps: {steps}, batch size {config.batch_size} × {config.gradient_accumulation_steps} accumulation",
        f"- {network}: rank {lora_config.r}, alpha {lora_config.lora_alpha}, on the UNet's {targets} "
        f"(`--target-modules {config.target_modules}`){text_encoder}; {trained.parameters:,} parameters",
        f"- optimizer: AdamW, learning rate {config.learning_rate} ({config.lr_scheduler}, "
        f"{config.lr_warmup_steps} warm-up steps), weight decay {config.weight_decay}",
        f"- {images}, flip {config.flip}, mixed precision {config.mixed_precision}, seed {config.seed}",
        f"- captions: one drawn per image and epoch, {config.caption_dropout:.0%} dropped to the empty caption"
        + (
            f", each after the trigger word `{config.trigger_word}` (put it in your prompts)"
            if config.trigger_word
            else ""
        ),
        f"- final loss: {final_loss:.5f} (last step); on a fixed batch: see `summary.json`",
        "",
        "Files: `adapter_model.safetensors` + `adapter_config.json` (PEFT: `PeftModel.from_pretrained`; the text "
        "encoder's in `text_encoder/` when trained),",
        "`pytorch_lora_weights.safetensors` (diffusers: `pipe.load_lora_weights`),",
        f"`{kohya_file_name(config.output.name)}` (kohya / A1111: the web UI's and ComfyUI's `models/Lora`"
        + (
            "; DoRA's magnitudes in it as LyCORIS' per-output-channel `dora_scale`, which LyCORIS, ComfyUI and "
            "Forge read; the A1111 web UI's built-in Lora extension misreads it (train LoRA for A1111), and "
            "diffusers' kohya loader drops it: in diffusers, load the diffusers file"
            if lora_config.use_dora
            else ""
        )
        + "), `training_config.json`,",
        "`metrics.jsonl` (loss and learning rate per step), `held_out.json` (captions never trained on).",
        "",
        "## Validation",
        "",
        "The validation prompts with fixed seeds, base model on top, this adapter below:",
        "",
        f"![validation grid]({VALIDATION_GRID})",
        "",
        EVALUATION_HEADING,
        "",
        f"Not evaluated yet: `python -m trainer eval --adapter {config.output}`.",
    ]
    (staging / "README.md").write_text("\n".join(card) + "\n")
    # mkdtemp and safetensors create owner-only files; workers often run as another user (in containers).
    for folder, _, files in os.walk(staging):  # text_encoder/ too, when trained
        Path(folder).chmod(0o755)
        for name in files:
            Path(folder, name).chmod(0o644)
    replace_folder(staging, config.output)
    print(f"published {config.output}")
    return config.output


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, whose old version (if any) is deleted.

    On Linux the two are exchanged in one step (renameat2 with RENAME_EXCHANGE), so a worker reloading
    at that instant finds the old version or the new one. Where the kernel or the filesystem cannot,
    two renames leave `target` missing for microseconds; a reload in them is refused as "not found" and
    the previous version keeps serving.
    """
    if target.exists() and _exchange(new, target):
        shutil.rmtree(new)  # now the old version
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{int(time.time())}"
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False where this system has no way to."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_current_directory, rename_exchange = -100, 2  # AT_FDCWD and RENAME_EXCHANGE from <fcntl.h>, <stdio.h>
    if renameat2(at_current_directory, os.fsencode(first), at_current_directory, os.fsencode(second), rename_exchange):
        error = ctypes.get_errno()
        if error in (errno.ENOSYS, errno.EINVAL):  # an old kernel, or a filesystem without exchange
            return False
        raise OSError(error, os.strerror(error), str(first), None, str(second))
    return True


def notify_workers(name: str) -> None:
    """Ask every worker to hot-reload adapter `name`, and print their answers."""
    from imagine.admin import format_reload
    from imagine.client import ImagineClient
    from imagine.settings import ServiceSettings

    print(format_reload(ImagineClient(ServiceSettings()).reload_adapters(name)))
