"""`python -m trainer train` on the tiny model and a tiny Flickr30k-format dataset, run as users run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import BIN, REPO, wait_for

pytestmark = pytest.mark.slow

TRAIN = ["--base-model", "tiny", "--resolution", "64", "--learning-rate", "1e-3", "--holdout-fraction", "0.125"]


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    """Eight images in Kaggle's layout (nested one level), two captions each, one broken caption line,
    and one truncated image that must be skipped and counted."""
    root = tmp_path_factory.mktemp("flickr30k")
    images = root / "flickr30k_images" / "flickr30k_images"
    images.mkdir(parents=True)
    lines = ["image_name| comment_number| comment"]
    for index in range(8):
        name = f"{1000 + index}.jpg"
        Image.new("RGB", (96, 80), (30 * index, 200 - 20 * index, 90)).save(images / name)
        lines += [f"{name}| 0| a picture number {index} .", f"{name}| 1| colour {index} on a field ."]
    lines.append("1007.jpg| 4   a broken line about picture 7 .")
    (images / "1007.jpg").write_bytes((images / "1007.jpg").read_bytes()[:200])
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    return root


def run_trainer(*args: str, model_cache, wait: bool = True, launcher: tuple[str, ...] = (sys.executable,), env=None):
    command = [*launcher, "-m", "trainer", "train", *args, "--model-cache-dir", str(model_cache)]
    if "--no-cache" not in args and "--cache-dir" not in args:
        command += ["--cache-dir", str(model_cache / "encoder-cache")]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def run_eval(*args: str):
    command = [sys.executable, "-m", "trainer", "eval", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def tensorboard_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def grid_rows(path) -> tuple[bytes, bytes]:
    """The top (base model) and bottom (adapter) rows of a validation grid."""
    with Image.open(path) as grid:
        width, height = grid.size
        return grid.crop((0, 0, width, height // 2)).tobytes(), grid.crop((0, height // 2, width, height)).tobytes()


def test_training_lowers_the_loss_and_writes_an_adapter_everyone_can_load(flickr, model_cache, tmp_path):
    output = tmp_path / "loradir" / "flickr30k"
    done = run_trainer(
        "--data",
        str(flickr),
        "--output",
        str(output),
        "--max-steps",
        "40",
        *TRAIN,
        "--lr-scheduler",
        "constant",
        "--validation-every",
        "20",
        "--validation-steps",
        "2",
        model_cache=model_cache,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "data: 6 training images, 1 held out; 1 images skipped: 1 unreadable or truncated" in done.stdout
    assert "trainable LoRA parameters: 9,984 of 1,096,581 (0.9105 %)" in done.stdout
    summary = json.loads((output / "summary.json").read_text())
    assert summary["fixed_batch_loss_after"] < summary["fixed_batch_loss_before"]
    assert {path.name for path in output.iterdir()} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "pytorch_lora_weights.safetensors",
        "flickr30k.safetensors",
        "README.md",
        "training_config.json",
        "metrics.jsonl",
    }
    # The kohya / A1111 single file loads through diffusers' kohya converter and renders as the diffusers file.
    from diffusers import StableDiffusionPipeline

    from worker.pipeline import resolve_base_model

    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model("tiny", model_cache), safety_checker=None)
    renders = {}
    for name in ("flickr30k.safetensors", "pytorch_lora_weights.safetensors"):
        pipe.load_lora_weights(output, weight_name=name, adapter_name=name.split(".")[0])
        pipe.set_adapters([name.split(".")[0]])
        generator = torch.Generator().manual_seed(0)
        renders[name] = pipe("a dog", num_inference_steps=2, width=64, height=64, generator=generator).images[0]
    assert renders["flickr30k.safetensors"].tobytes() == renders["pytorch_lora_weights.safetensors"].tobytes()
    assert "`flickr30k.safetensors` (kohya / A1111" in (output / "README.md").read_text()
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics] == list(range(1, 41))

    # Validation grids at steps 20 and 40: the base row is the same each time (fixed prompts and seeds),
    # the adapter row has moved away from it; the last grid is published with the adapter.
    work = output.parent / ".flickr30k.training"
    grids = sorted((work / "validation").glob("step-*.png"))
    assert [path.name for path in grids] == ["step-000020.png", "step-000040.png"]
    with Image.open(grids[-1]) as grid:
        assert grid.size == (4 * 256, 2 * 256)  # four prompts, base above adapter
    (base_20, adapted_20), (base_40, adapted_40) = grid_rows(grids[0]), grid_rows(grids[1])
    assert base_20 == base_40 and adapted_40 != base_40 and adapted_40 != adapted_20
    assert (output / "validation.png").read_bytes() == grids[-1].read_bytes()
    card = (output / "README.md").read_text()
    assert "![validation grid](validation.png)" in card and "Not evaluated yet" in card

    # TensorBoard holds the same losses as metrics.jsonl, and the grids.
    events = tensorboard_events(work / "tensorboard")
    logged = events.Scalars("train/loss")
    assert [event.step for event in logged] == list(range(1, 41))
    assert [event.value for event in logged] == pytest.approx([line["loss"] for line in metrics], rel=1e-6)
    assert [event.step for event in events.Images("validation/base (top) vs adapter (bottom)")] == [20, 40]
    assert not list(output.parent.glob(f".{output.name}.[!t]*"))  # no half-published folder left behind

    peft_state = load_file(output / "adapter_model.safetensors")
    assert peft_state and all(".lora_A." in key or ".lora_B." in key for key in peft_state)  # only LoRA trained
    assert all(key.startswith("base_model.model.") for key in peft_state)
    assert sum(tensor.numel() for tensor in peft_state.values()) == 9984

    from diffusers import StableDiffusionPipeline
    from peft import PeftModel

    from worker.adapters import AdapterRegistry
    from worker.pipeline import choose_placement, load_pipeline

    def render(pipe) -> bytes:
        image = pipe(
            "a picture", num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(0)
        ).images[0]
        return image.tobytes()

    placement = choose_placement("cpu", "float32")
    stock = load_pipeline("tiny", placement, model_cache, safety_checker=False)
    base = render(stock)
    assert isinstance(stock, StableDiffusionPipeline)
    stock.load_lora_weights(str(output), weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    with_stock_loader = render(stock)
    assert with_stock_loader != base

    peft_pipe = load_pipeline("tiny", placement, model_cache, safety_checker=False)
    peft_pipe.unet = PeftModel.from_pretrained(peft_pipe.unet, str(output))
    assert render(peft_pipe) == with_stock_loader  # both formats hold the same adapter

    served = load_pipeline("tiny", placement, model_cache, safety_checker=False)
    registry = AdapterRegistry(served, output.parent)
    assert registry.load("flickr30k").layout == "peft" and registry.loaded["flickr30k"].modules == 32
    registry.activate((("flickr30k", 1.0),))
    assert render(served) == with_stock_loader


def test_interrupted_and_resumed_equals_uninterrupted(flickr, model_cache, tmp_path):
    common = ["--data", str(flickr), "--max-steps", "40", "--checkpoint-every", "10", *TRAIN]
    straight = tmp_path / "a" / "straight"
    assert run_trainer(*common, "--output", str(straight), model_cache=model_cache).returncode == 0

    resumed = tmp_path / "b" / "resumed"
    process = run_trainer(*common, "--output", str(resumed), model_cache=model_cache, wait=False)
    checkpoints = resumed.parent / ".resumed.training" / "checkpoints"
    wait_for(lambda: (checkpoints / "checkpoint-10").is_dir(), 120, "the first checkpoint", interval=0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert not resumed.exists(), "the run finished before it could be interrupted"

    # A checkpoint holds the LoRA weights, the optimizer and the schedule, not the frozen UNet.
    checkpoint = checkpoints / "checkpoint-10"
    assert {path.name for path in checkpoint.iterdir()} == {
        "lora.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "progress.json",
    }
    lora = load_file(checkpoint / "lora.safetensors")
    assert all(".lora_A." in key or ".lora_B." in key for key in lora)
    assert sum(tensor.numel() for tensor in lora.values()) == 9984

    # A checkpoint continues only a run of the same shape.
    other = run_trainer(
        *common, "--batch-size", "2", "--output", str(resumed), "--resume", "latest", model_cache=model_cache
    )
    assert other.returncode == 2, other.stdout + other.stderr
    assert "belongs to a run of another shape (batch size 1 then, 2 now)" in other.stdout

    again = run_trainer(*common, "--output", str(resumed), "--resume", "latest", model_cache=model_cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from" in again.stdout and "checkpoint-" in again.stdout
    first, second = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-6), key
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    # The resumed run replaced in TensorBoard the steps the killed run logged after its checkpoint.
    logged = tensorboard_events(resumed.parent / ".resumed.training" / "tensorboard").Scalars("train/loss")
    assert [event.step for event in logged] == list(range(1, 41))

    # The same command again finds the run finished; a fresh run into the same output must say what it does.
    rerun = run_trainer(*common, "--output", str(resumed), "--resume", "latest", model_cache=model_cache)
    assert rerun.returncode == 0 and "this run finished at step 40" in rerun.stdout, rerun.stdout + rerun.stderr
    assert load_file(resumed / "adapter_model.safetensors").keys() == second.keys()
    fresh = run_trainer(*common, "--output", str(resumed), model_cache=model_cache)
    assert fresh.returncode == 2 and "left checkpoints" in fresh.stdout and "add --resume latest" in fresh.stdout


def test_two_processes_train_like_one_process_with_the_whole_batch(flickr, model_cache, tmp_path):
    """`accelerate launch` / torchrun on several GPUs, here two CPU processes over gloo: each takes its
    share of every batch, gradients are averaged, and the schedule counts optimizer steps, so two
    processes with batch 1 end on the weights of one process with batch 2."""
    common = ["--data", str(flickr), "--max-steps", "6", "--lr-warmup-steps", "2", "--validation-every", "0"]
    common += ["--validation-steps", "1", *TRAIN]
    single = tmp_path / "single" / "adapter"
    done = run_trainer(*common, "--batch-size", "2", "--output", str(single), model_cache=model_cache)
    assert done.returncode == 0, done.stdout + done.stderr

    shared = tmp_path / "shared" / "adapter"
    torchrun = (str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets
    two = [*common, "--batch-size", "1", "--checkpoint-every", "3"]
    done = run_trainer(*two, "--output", str(shared), model_cache=model_cache, launcher=torchrun, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((shared / "summary.json").read_text())["processes"] == 2
    assert done.stdout.count("published") == 1  # one process writes

    def read(folder):
        return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert [line["lr"] for line in read(shared)] == pytest.approx([line["lr"] for line in read(single)])
    assert [line["loss"] for line in read(shared)] == pytest.approx([line["loss"] for line in read(single)], abs=1e-5)
    first, second = load_file(single / "adapter_model.safetensors"), load_file(shared / "adapter_model.safetensors")
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-5), key

    # Two processes resumed from the two-process run's checkpoint at step 3 end on its weights.
    checkpoint = shared.parent / ".adapter.training" / "checkpoints" / "checkpoint-3"
    resumed = tmp_path / "resumed" / "adapter"
    done = run_trainer(
        *two,
        "--output",
        str(resumed),
        "--resume",
        str(checkpoint),
        model_cache=model_cache,
        launcher=torchrun,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    third = load_file(resumed / "adapter_model.safetensors")
    for key in second:
        assert torch.allclose(second[key], third[key], atol=1e-6), key


def test_config_file_and_impossible_combinations_fail_before_loading(flickr, model_cache, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{flickr}"\noutput = "{tmp_path / "out" / "x"}"\nmax-steps = 5\nepochs = 2\n')
    started = time.monotonic()
    both = run_trainer("--config", str(config), model_cache=model_cache)
    assert both.returncode == 2 and "give exactly one of --max-steps and --epochs" in both.stdout
    bad = run_trainer(
        "--data",
        str(flickr),
        "--output",
        str(tmp_path / "y"),
        "--max-steps",
        "3",
        "--resolution",
        "100",
        model_cache=model_cache,
    )
    assert bad.returncode == 2 and "--resolution must be a multiple of 8" in bad.stdout
    unknown = tmp_path / "typo.yaml"
    unknown.write_text("data: x\noutput: y\nmax_step: 3\n")
    typo = run_trainer("--config", str(unknown), model_cache=model_cache)
    assert typo.returncode == 2 and "unknown option(s)" in typo.stdout and "max_step" in typo.stdout
    assert time.monotonic() - started < 60  # no model was loaded for any of them

    config.write_text(f'data = "{flickr}"\noutput = "{tmp_path / "out" / "x"}"\nmax-steps = 500\n')
    overridden = run_trainer("--config", str(config), "--max-steps", "2", *TRAIN, model_cache=model_cache)
    assert overridden.returncode == 0, overridden.stdout + overridden.stderr
    assert json.loads((tmp_path / "out" / "x" / "training_config.json").read_text())["max_steps"] == 2


def test_cached_and_uncached_training_give_the_same_losses(flickr, model_cache, tmp_path):
    common = ["--data", str(flickr), "--max-steps", "6", "--flip", *TRAIN]
    cache = tmp_path / "cache"
    runs = {}
    for name, extra in [
        ("first", ["--cache-dir", str(cache)]),
        ("uncached", ["--no-cache"]),
        ("cached", ["--cache-dir", str(cache)]),
    ]:
        output = tmp_path / name / "adapter"
        done = run_trainer(*common, "--output", str(output), *extra, model_cache=model_cache)
        assert done.returncode == 0, done.stdout + done.stderr
        losses = [json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (losses, json.loads((output / "summary.json").read_text()))
    # Each of the 6 steps of one image needs its latents and its caption's states: the first run encodes
    # what it has not met yet, the second only reads (the fixed batch's loss is not counted).
    first = runs["first"][1]
    assert first["cache_misses"] > 0 and first["cache_hits"] + first["cache_misses"] == 12
    cached = runs["cached"][1]
    assert cached["cache_misses"] == 0 and cached["cache_hits"] == 12
    # ...and trains without the VAE and the text encoder, loaded for the final validation grid only.
    assert cached["encoders_loaded"] == ["vae for validation", "text_encoder for validation"]
    assert "vae for training" in runs["first"][1]["encoders_loaded"]
    assert any(path.name.endswith("-flip.safetensors") for path in cache.rglob("latent-*"))
    for name in ("first", "cached"):
        assert runs[name][0] == pytest.approx(runs["uncached"][0], abs=1e-5)
    assert cached["cache_read_ms_per_item"] < runs["first"][1]["encode_ms_per_item"]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(flickr, model_cache, tmp_path):
    output = tmp_path / "loradir" / "exploding"
    done = run_trainer(
        "--data",
        str(flickr),
        "--output",
        str(output),
        "--max-steps",
        "5",
        "--checkpoint-every",
        "1",
        "--learning-rate",
        "1e30",
        "--max-grad-norm",
        "1e30",
        *TRAIN[:4],
        model_cache=model_cache,
    )
    assert done.returncode == 1
    assert "the loss became nan at step 2; training stopped. The last good checkpoint is" in done.stdout
    assert "checkpoint-1" in done.stdout and "try a lower --learning-rate" in done.stdout
    assert not output.exists()  # nothing half-trained is published
    assert (output.parent / ".exploding.training" / "checkpoints" / "checkpoint-1").is_dir()


def test_data_that_leaves_nothing_to_train_and_targets_that_match_nothing_are_refused(flickr, model_cache, tmp_path):
    common = ["--data", str(flickr), "--output", str(tmp_path / "loradir" / "x"), "--max-steps", "2"]
    # Every picture (96x80) would be enlarged 1.6 times to fill its 128x128 bucket: none is left.
    enlarged = run_trainer(
        *common,
        *TRAIN[:2],
        "--resolution",
        "128",
        "--buckets",
        "--bucket-step",
        "32",
        "--bucket-max-upscale",
        "1.2",
        model_cache=model_cache,
    )
    assert enlarged.returncode == 2, enlarged.stdout + enlarged.stderr
    assert (
        f"trainer: no usable training image in {flickr} (7 images skipped: 6 upscaled more than 1.2x"
        in enlarged.stdout
    )
    typo = run_trainer(*common, *TRAIN, "--target-modules", "to_q,to_qq", model_cache=model_cache)
    assert typo.returncode == 2, typo.stdout + typo.stderr
    assert "trainer: --target-modules: to_qq name(s) no module of the UNet" in typo.stdout
    assert not (tmp_path / "loradir" / "x").exists()


@pytest.fixture(scope="module")
def mixed_aspects(tmp_path_factory):
    """Nine pictures, landscape (4:3, as most of Flickr30k), portrait and square, in the metadata.jsonl layout."""
    root = tmp_path_factory.mktemp("mixed-aspects")
    lines = []
    for index in range(9):
        size = [(200, 150), (150, 200), (130, 130)][index % 3]
        Image.new("RGB", size, (25 * index, 120, 200 - 20 * index)).save(root / f"{index}.jpg")
        lines.append(json.dumps({"file_name": f"{index}.jpg", "text": f"a picture number {index}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


BUCKETED = ["--base-model", "tiny", "--resolution", "128", "--buckets", "--bucket-step", "32", "--batch-size", "2"]
BUCKETED += ["--learning-rate", "1e-3", "--lr-scheduler", "constant", "--holdout-fraction", "0"]
BUCKETED += ["--validation-every", "0", "--validation-steps", "1"]


def test_bucketed_training_resumes_exactly_and_keeps_a_square_validation_grid(mixed_aspects, model_cache, tmp_path):
    cache = tmp_path / "cache"
    common = ["--data", str(mixed_aspects), *BUCKETED, "--cache-dir", str(cache)]
    straight = tmp_path / "a" / "straight"
    done = run_trainer(*common, "--output", str(straight), "--max-steps", "8", model_cache=model_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "buckets (width x height: images): 96x160: 3, 128x128: 3, 160x96: 3" in done.stdout
    assert {path.name for path in cache.rglob("latent-0*")} == {"latent-0-160x96.safetensors"}  # keyed per bucket
    with Image.open(straight / "validation.png") as grid:
        assert grid.size == (4 * 256, 2 * 256)  # square, whatever the buckets

    # Four steps, then four more resumed from its checkpoint: the weights of the eight straight steps.
    resumed = tmp_path / "b" / "resumed"
    first = run_trainer(
        *common, "--output", str(resumed), "--max-steps", "4", "--validation-size", "160x96", model_cache=model_cache
    )
    assert first.returncode == 0, first.stdout + first.stderr
    with Image.open(resumed / "validation.png") as grid:
        assert grid.size == (4 * 256, 2 * 154)  # as asked: 160x96 cells, 256 px wide
    rest = run_trainer(
        *common, "--output", str(resumed), "--max-steps", "8", "--resume", "latest", model_cache=model_cache
    )
    assert rest.returncode == 0 and "at step 4" in rest.stdout, rest.stdout + rest.stderr
    one, other = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert one.keys() == other.keys()
    for key in one:
        assert torch.allclose(one[key], other[key], atol=1e-6), key


def stock_pipeline(model_cache):
    from diffusers import StableDiffusionPipeline

    from worker.pipeline import resolve_base_model

    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model("tiny", model_cache), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def merge_as_lycoris(pipe, kohya: dict[str, torch.Tensor]) -> int:
    """Merge a kohya / LyCORIS file into the pipeline's weights the way LyCORIS defines it (W + up @ down *
    alpha / rank, and with a `dora_scale`, DoRA's weight decomposed per output channel: that magnitude times
    the merged weight over its norm); returns how many modules it changed."""
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in pipe.unet.named_modules()}
    for name, module in pipe.text_encoder.named_modules():  # A1111's SD 1.x names: lora_te_text_model_…
        full_name = name if name.startswith("text_model.") else f"text_model.{name}"
        modules["lora_te_" + full_name.replace(".", "_")] = module
    merged = 0
    with torch.no_grad():
        for key in [key for key in kohya if key.endswith(".lora_down.weight")]:
            name = key.removesuffix(".lora_down.weight")
            down, up, weight = kohya[key], kohya[f"{name}.lora_up.weight"], modules[name].weight
            scale = kohya[f"{name}.alpha"].item() / down.shape[0] if f"{name}.alpha" in kohya else 1.0
            new = weight + (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
            if f"{name}.dora_scale" in kohya:
                norm = new.reshape(new.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (new.ndim - 1))
                new = kohya[f"{name}.dora_scale"].reshape(-1, *[1] * (new.ndim - 1)) * new / norm
            weight.copy_(new)
            merged += 1
    return merged


def nearly_the_same_pixels(first: bytes, second: bytes) -> bool:
    """Two renders' raw RGB bytes, the same image but for rounding (merged weights against peft's layers)."""
    import numpy as np

    if len(first) != len(second):
        return False
    differences = np.abs(np.frombuffer(first, np.uint8).astype(np.int16) - np.frombuffer(second, np.uint8))
    return int(differences.max()) <= 1 and float((differences > 0).mean()) <= 0.05


@pytest.mark.parametrize("network", ["lora", "dora"])
def test_convolutions_and_a_text_encoder_trained_serve_alike_from_every_file(flickr, model_cache, tmp_path, network):
    """LoCon-like targets (the ResNet convolutions too) and a text encoder LoRA, as LoRA and as DoRA: the worker
    renders what stock diffusers renders from the diffusers file, and for LoRA from the kohya / A1111 file."""
    from worker.adapters import AdapterRegistry
    from worker.pipeline import choose_placement, load_pipeline

    output = tmp_path / "loradir" / network
    dora = ["--use-dora"] if network == "dora" else []
    done = run_trainer(
        "--data",
        str(flickr),
        "--output",
        str(output),
        "--max-steps",
        "6",
        *TRAIN[:4],
        "--learning-rate",
        "1e-2",
        *dora,
        "--target-modules",
        "locon",
        "--train-text-encoder",
        "--text-encoder-lr",
        "5e-3",
        "--validation-every",
        "0",
        "--validation-steps",
        "1",
        model_cache=model_cache,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    card = (output / "README.md").read_text()
    assert ("DoRA (weight-decomposed LoRA)" in card) == bool(dora) and "`--target-modules locon`" in card
    assert "text encoder's k_proj, out_proj, q_proj, v_proj (learning rate 0.005)" in card
    # Readable by workers running as another user, the text encoder's folder included (root, as in these
    # tests, would read it whatever its mode).
    for folder, _, files in os.walk(output):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder
        assert all(os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644 for name in files), folder
    unet_state = load_file(output / "adapter_model.safetensors")
    text_state = load_file(output / "text_encoder" / "adapter_model.safetensors")
    assert any(key.endswith(".conv1.lora_A.weight") for key in unet_state)
    assert any(key.endswith(".q_proj.lora_B.weight") for key in text_state)
    magnitudes = [key for key in (*unet_state, *text_state) if key.endswith("lora_magnitude_vector")]
    lora_a = [key for key in (*unet_state, *text_state) if key.endswith(".lora_A.weight")]
    assert len(magnitudes) == (len(lora_a) if dora else 0)

    def render(pipe) -> bytes:
        generator = torch.Generator().manual_seed(0)
        return pipe("a picture", num_inference_steps=2, width=64, height=64, generator=generator).images[0].tobytes()

    served = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
    base = render(served)
    registry = AdapterRegistry(served, output.parent)
    info = registry.load(network)
    assert info.layout == "peft" and info.modules == len(lora_a)
    registry.activate(((network, 1.0),))
    by_worker = render(served)
    assert by_worker != base

    def stock(weight_name: str):
        pipe = stock_pipeline(model_cache)
        pipe.load_lora_weights(output, weight_name=weight_name)
        return pipe

    assert render(stock("pytorch_lora_weights.safetensors")) == by_worker
    kohya = load_file(output / f"{network}.safetensors")
    if dora:
        # One LyCORIS dora_scale per module, per output channel. diffusers' kohya loader drops them: the file
        # is merged into the base weights as LyCORIS defines it, and renders what the diffusers file renders.
        scales = {key: tensor for key, tensor in kohya.items() if key.endswith(".dora_scale")}
        assert len(scales) == len(lora_a)
        assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (32, 1, 1, 1)
        assert all(tensor.shape[1:] in ((1,), (1, 1, 1)) for tensor in scales.values())
        merged = stock_pipeline(model_cache)
        assert merge_as_lycoris(merged, kohya) == len(lora_a)
        assert nearly_the_same_pixels(render(merged), by_worker)
    else:
        assert render(stock(f"{network}.safetensors")) == by_worker
    # The text encoder's modules under the names A1111 gives them in SD 1.x files.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya


@pytest.fixture(scope="module")
def trained(flickr, model_cache, tmp_path_factory):
    """An adapter trained with a quarter of the images held out, so there are captions to evaluate on."""
    output = tmp_path_factory.mktemp("eval") / "loradir" / "flickr30k"
    done = run_trainer(
        "--data",
        str(flickr),
        "--output",
        str(output),
        "--max-steps",
        "20",
        *TRAIN[:4],
        "--learning-rate",
        "1e-2",
        "--holdout-fraction",
        "0.25",
        "--validation-every",
        "0",
        "--validation-steps",
        "1",
        model_cache=model_cache,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return output


def test_eval_reports_clip_scores_with_a_confidence_interval(trained, tiny_clip):
    done = run_eval("--adapter", str(trained), "--clip-model", str(tiny_clip), "--steps", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((trained / "eval" / "report.json").read_text())
    held_out = json.loads((trained / "held_out.json").read_text())
    # Two held-out images with two captions each: every caption once, first captions first.
    assert [entry["caption"] for entry in report["per_caption"]] == [
        held_out[0]["captions"][0],
        held_out[1]["captions"][0],
        held_out[0]["captions"][1],
        held_out[1]["captions"][1],
    ]
    assert report["captions"] == 4 and report["base_model"] == "tiny" and report["clip_model"] == str(tiny_clip)
    base = [entry["base"] for entry in report["per_caption"]]
    adapted = [entry["adapter"] for entry in report["per_caption"]]
    assert all(0 < score <= 100 for score in base + adapted)
    assert base != adapted  # the adapter changed the images
    assert report["clip_score_base"] == pytest.approx(sum(base) / 4)
    assert report["difference"] == pytest.approx((sum(adapted) - sum(base)) / 4)
    low, high = report["difference_interval"]
    assert low <= report["difference"] <= high and low < high
    differences = [a - b for a, b in zip(adapted, base, strict=True)]
    assert min(differences) <= low and high <= max(differences)

    with Image.open(trained / "eval" / "grid.png") as grid:
        assert grid.size == (4 * 256, 2 * 256)
    card = (trained / "README.md").read_text()
    assert "Not evaluated yet" not in card and "## Validation" in card
    assert f"base {report['clip_score_base']:.2f}, adapter {report['clip_score_adapter']:.2f}" in card
    assert (
        "(95 % CI" in card and "![base model (top) and adapter (bottom) on held-out captions](eval/grid.png)" in card
    )
    assert f"difference {report['difference']:+.2f}" in done.stdout

    again = run_eval("--adapter", str(trained), "--clip-model", str(tiny_clip), "--steps", "3")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((trained / "eval" / "report.json").read_text()) == report  # fixed seeds: the same report
    assert (trained / "README.md").read_text() == card  # the section is replaced, not appended


def test_eval_refuses_what_it_cannot_use_with_a_clear_message(trained, tiny_clip, tmp_path):
    missing = run_eval("--adapter", str(tmp_path / "nowhere"), "--clip-model", str(tiny_clip))
    assert missing.returncode == 2 and "no such folder, nor an adapter of that name in LORA_DIR" in missing.stdout

    one_line = tmp_path / "one.txt"
    one_line.write_text("a single prompt\n")
    few = run_eval("--adapter", str(trained), "--clip-model", str(tiny_clip), "--captions-file", str(one_line))
    assert few.returncode == 2 and "a confidence interval needs at least 2" in few.stdout

    offline = subprocess.run(
        [sys.executable, "-m", "trainer", "eval", "--adapter", str(trained), "--clip-model", "no-org/no-clip"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert offline.returncode == 2, offline.stdout + offline.stderr
    assert "could not load the CLIP model 'no-org/no-clip'" in offline.stdout
    assert "--clip-model" in offline.stdout  # says how to point at a local copy


def test_publishing_replaces_the_old_adapter_in_one_step(tmp_path):
    from trainer.publish import replace_folder

    published, staging = tmp_path / "loradir" / "flickr30k", tmp_path / "loradir" / ".flickr30k.staging"
    published.mkdir(parents=True)
    (published / "adapter_model.safetensors").write_text("old")
    staging.mkdir()
    (staging / "adapter_model.safetensors").write_text("new")
    (staging / "README.md").write_text("card")
    replace_folder(staging, published)
    assert (published / "adapter_model.safetensors").read_text() == "new" and (published / "README.md").is_file()
    assert [path.name for path in published.parent.iterdir()] == ["flickr30k"]  # the old version is gone

    fresh = tmp_path / "loradir" / ".other.staging"
    fresh.mkdir()
    replace_folder(fresh, tmp_path / "loradir" / "other")  # nothing to replace: a plain rename
    assert sorted(path.name for path in published.parent.iterdir()) == ["flickr30k", "other"]
