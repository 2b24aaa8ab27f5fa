"""Adapters in LORA_DIR on the real tiny pipeline: the three layouts, scales, and every refusal."""

from __future__ import annotations

import os

import pytest

from imagine.contract import Limits, parse_job_options
from tests.helpers import pixels, write_adapter
from worker.adapters import AdapterError, AdapterRegistry, list_adapters
from worker.renderer import Renderer

LIMITS = Limits()


def render(renderer: Renderer, adapter: str, scale: float = 1.0) -> bytes:
    """The first image's pixels (PNG bytes also carry the adapter's name, so they differ by name)."""
    options = parse_job_options(
        {
            "prompt": "a dog",
            "num_inference_steps": 3,
            "width": 64,
            "height": 64,
            "seed": 3,
            "adapter": adapter,
            "adapter_scale": scale,
        },
        LIMITS,
    )
    return pixels(renderer.render(options).images[0])


@pytest.fixture
def lora_dir(tmp_path, adapter_weights):
    folder = tmp_path / "loradir"
    write_adapter(folder / "peft", "peft", adapter_weights["v1"])
    write_adapter(folder / "diffusers", "diffusers", adapter_weights["v1"])
    write_adapter(folder / "kohya", "kohya", adapter_weights["v1"])
    return folder


@pytest.fixture
def setup(tiny_pipe, lora_dir):
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    return registry, Renderer(tiny_pipe, registry, default_adapter="", allow_safety_checker_off=False)


def test_three_layouts_of_the_same_weights_render_the_same_image(setup, lora_dir):
    registry, renderer = setup
    assert list_adapters(lora_dir) == ["diffusers", "kohya", "peft"]
    layouts = {name: registry.load(name).layout for name in list_adapters(lora_dir)}
    assert layouts == {"diffusers": "diffusers", "kohya": "kohya", "peft": "peft"}
    base = render(renderer, "none")
    images = {name: render(renderer, name) for name in layouts}
    assert images["peft"] == images["diffusers"] == images["kohya"]
    assert images["peft"] != base
    assert render(renderer, "none") == base  # switching back to no adapter really removes it


def test_scale_zero_is_the_base_model(setup):
    registry, renderer = setup
    registry.load("peft")
    assert render(renderer, "peft", scale=0.0) == render(renderer, "none")
    assert render(renderer, "peft", scale=0.5) != render(renderer, "peft", scale=1.0)


def test_every_adapted_module_is_counted(setup):
    registry, _ = setup
    loaded = registry.load("peft")
    # The tiny UNet has 8 attention blocks (attn1 and attn2 in 4 transformers), 4 projections each.
    assert loaded.modules == 32


def test_pickle_adapter_is_refused(setup, lora_dir):
    registry, _ = setup
    (lora_dir / "old").mkdir()
    (lora_dir / "old" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    (lora_dir / "legacy.ckpt").write_bytes(b"\x80\x04pickle")
    for name in ("old", "legacy"):
        with pytest.raises(AdapterError, match=r"pickle file .*arbitrary code.*only safetensors"):
            registry.load(name)


@pytest.mark.parametrize("name", ["../peft", "peft/../kohya", "/etc", "none", ".hidden", ""])
def test_adapter_names_with_path_tricks_are_refused(setup, name):
    registry, _ = setup
    with pytest.raises(AdapterError, match="not a valid adapter name"):
        registry.load(name)


def test_symlink_out_of_lora_dir_is_refused(setup, lora_dir, tmp_path, adapter_weights):
    registry, _ = setup
    outside = write_adapter(tmp_path / "elsewhere", "diffusers", adapter_weights["v1"])
    os.symlink(outside, lora_dir / "sneaky")
    with pytest.raises(AdapterError, match="outside LORA_DIR"):
        registry.load("sneaky")


def test_missing_adapter_is_refused(setup):
    registry, renderer = setup
    with pytest.raises(AdapterError, match="'ghost' not found"):
        registry.load("ghost")
    with pytest.raises(AdapterError, match="'ghost' is not loaded on this worker"):
        render(renderer, "ghost")


def test_corrupted_or_truncated_replacement_keeps_the_old_version(setup, lora_dir):
    registry, renderer = setup
    first = registry.load("diffusers")
    before = render(renderer, "diffusers")
    weights = lora_dir / "diffusers" / "pytorch_lora_weights.safetensors"
    good = weights.read_bytes()
    for broken in (good[: len(good) // 2], b"\x00" * 64, b""):
        weights.write_bytes(broken)
        with pytest.raises(AdapterError, match=f"version {first.version} keeps serving|not a valid safetensors"):
            registry.load("diffusers")
        assert registry.loaded["diffusers"].version == first.version
        assert render(renderer, "diffusers") == before


def test_adapter_for_another_base_model_is_refused(setup, lora_dir, tmp_path):
    """Wrong shapes and unknown modules are both caught, and nothing of them stays in the pipeline."""
    from dataclasses import replace

    from tests.helpers import make_lora_state
    from worker.pipeline import BUILT_IN_MODELS, build_random_pipeline

    registry, renderer = setup
    other = build_random_pipeline(
        replace(BUILT_IN_MODELS["tiny"], seed=5, unet_channels=(32, 48), text_hidden_size=24)
    )
    write_adapter(lora_dir / "wrong-shapes", "diffusers", make_lora_state(other.unet, seed=3))
    with pytest.raises(AdapterError, match=r"does not fit the base model.*another base model"):
        registry.load("wrong-shapes")

    renamed = tmp_path / "renamed.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(lora_dir / "diffusers" / "pytorch_lora_weights.safetensors")
    save_file({key.replace("mid_block.", "mid_blocks."): value for key, value in state.items()}, renamed)
    (lora_dir / "wrong-modules").mkdir()
    renamed.rename(lora_dir / "wrong-modules" / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match=r"only 24 of its 32 LoRA modules match"):
        registry.load("wrong-modules")
    assert registry.loaded == {}
    assert tiny_pipe_adapters(renderer) == set()


def tiny_pipe_adapters(renderer: Renderer) -> set[str]:
    return {name for names in renderer.pipe.get_list_adapters().values() for name in names}


def test_stock_loader_silently_ignores_peft_layout_but_ours_does_not(tiny_pipe, lora_dir):
    """The trap this module exists for: stock diffusers loads nothing from a PEFT folder, without an error."""
    tiny_pipe.load_lora_weights(str(lora_dir / "peft"), weight_name="adapter_model.safetensors", adapter_name="x")
    assert "x" not in {name for names in tiny_pipe.get_list_adapters().values() for name in names}
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    assert registry.load("peft").modules == 32


@pytest.mark.parametrize("config", ["[]", '{"lora_alpha": "8"}', "{not json"])
def test_broken_peft_config_is_refused(setup, lora_dir, config):
    registry, _ = setup
    (lora_dir / "peft" / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterError, match=r"adapter_config\.json"):
        registry.load("peft")


def test_unknown_layout_is_refused(setup, lora_dir):
    import torch
    from safetensors.torch import save_file

    registry, _ = setup
    (lora_dir / "random").mkdir()
    save_file({"some.weight": torch.zeros(2)}, lora_dir / "random" / "model.safetensors")
    with pytest.raises(AdapterError, match="no known LoRA layout"):
        registry.load("random")


def test_default_adapter_missing_gives_a_clear_message(tiny_pipe, lora_dir):
    renderer = Renderer(tiny_pipe, AdapterRegistry(tiny_pipe, lora_dir), "flickr30k", allow_safety_checker_off=False)
    with pytest.raises(AdapterError, match=r"default adapter .flickr30k. is not loaded.*DEFAULT_ADAPTER"):
        render(renderer, None)


def _broken_files():
    """Each kind of bad LoRA tensor, as a change to a good diffusers state dict, and the words that refuse it."""
    import torch

    def first(state, part):
        return next(key for key in state if key.endswith(f".{part}.weight"))

    def replace(part, make):
        return lambda state: {**state, first(state, part): make(state[first(state, part)])}

    return {
        "one dimension": (replace("lora_A", lambda t: t.flatten()), r"has shape \(\d+,\); a LoRA matrix has 2 dim"),
        "three dimensions": (replace("lora_B", lambda t: t[None]), r"has shape \(1, \d+, 4\); a LoRA matrix has 2"),
        "integers": (
            replace("lora_A", lambda t: t.to(torch.int32)),
            "holds int32 values; a LoRA matrix holds floating",
        ),
        "NaN": (replace("lora_B", lambda t: t * float("nan")), "holds NaN or infinite values"),
        "ranks that differ": (replace("lora_A", lambda t: t[:2]), "down matrix of rank 2 but an up matrix of rank 4"),
        "no up matrix": (
            lambda s: {k: v for k, v in s.items() if k != first(s, "lora_B")},
            "has no up \\(B\\) matrix",
        ),
    }


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
@pytest.mark.parametrize("kind", list(_broken_files()))
def test_each_broken_tensor_is_refused_in_words(setup, lora_dir, kind, layout):
    import shutil

    from safetensors.torch import load_file, save_file

    registry, _ = setup
    change, words = _broken_files()[kind]
    shutil.copytree(lora_dir / layout, lora_dir / "broken")
    weights = next((lora_dir / "broken").glob("*.safetensors"))
    save_file(change(load_file(weights)), weights)
    with pytest.raises(AdapterError, match=f"adapter 'broken': {weights.name}: .*{words}"):
        registry.load("broken")
    assert registry.loaded == {}


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tiny_pipe, lora_dir):
    huge = lora_dir / "huge.safetensors"
    with huge.open("wb") as file:  # 2 GiB, sparse: nothing is written, and nothing may be read
        file.truncate(2 * 2**30)
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    with pytest.raises(AdapterError, match=r"huge.safetensors is 2,048 MiB, more than MAX_ADAPTER_BYTES \(512 MiB\)"):
        registry.load("huge")
    small_limit = AdapterRegistry(tiny_pipe, lora_dir, max_bytes=1000)
    with pytest.raises(AdapterError, match="more than MAX_ADAPTER_BYTES"):
        small_limit.load("diffusers")


def test_two_layouts_in_one_folder_must_agree_and_a_change_to_either_is_noticed(setup, lora_dir, adapter_weights):
    from safetensors.torch import load_file, save_file

    from worker.adapters import save_adapter

    registry, renderer = setup
    # Both layouts side by side, as the trainer writes them.
    model = adapter_weights["v1"]
    from peft.utils import get_peft_model_state_dict

    state = {key.removeprefix("base_model.model."): value for key, value in get_peft_model_state_dict(model).items()}
    save_adapter(lora_dir / "both", state, model.peft_config["default"])
    loaded = registry.load("both")
    assert loaded.file == "adapter_model.safetensors (= pytorch_lora_weights.safetensors)"
    registry.load("peft")
    assert render(renderer, "both") == render(renderer, "peft")

    diffusers_file = lora_dir / "both" / "pytorch_lora_weights.safetensors"
    other = load_file(lora_dir / "diffusers" / "pytorch_lora_weights.safetensors")
    save_file({key: value * 2 for key, value in other.items()}, diffusers_file)  # only this one replaced
    with pytest.raises(AdapterError, match=r"holds two layouts that disagree.*version \w{12} keeps serving"):
        registry.load("both")
    assert registry.loaded["both"].version == loaded.version
