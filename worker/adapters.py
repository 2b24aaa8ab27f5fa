"""LoRA adapters in LORA_DIR: finding, reading, checking and hot-swapping them in a loaded pipeline.

Three layouts are read, detected by their tensor names rather than their file names:
  - PEFT (`adapter_model.safetensors` + `adapter_config.json`, keys under `base_model.model.`), the
    format the seed project and our trainer write. Stock `load_lora_weights` loads nothing from it and
    raises nothing, so its keys are rewritten to diffusers' and its alpha folded into the weights.
  - diffusers (`pytorch_lora_weights.safetensors`, keys under `unet.` / `text_encoder.`).
  - kohya / A1111 (one `.safetensors` file, keys `lora_unet_...` / `lora_te_...`).
Whatever the layout, a load counts the modules that actually received LoRA weights and refuses the
adapter when any tensor found no module: an adapter for another base model never half-applies.
A folder holding both the PEFT and the diffusers file (as our trainer writes it) is read whole: the two
must hold the same weights, so a change to either file is noticed, and the version hashes both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from imagine.contract import ADAPTER_NAME_PATTERN, NO_ADAPTER
from imagine.wire import AdapterInfo
from worker.settings import DEFAULT_MAX_ADAPTER_BYTES

logger = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PEFT_PREFIX = "base_model.model."
TEXT_ENCODER_FOLDER = "text_encoder"
"""Where a PEFT-layout adapter keeps its text encoder's LoRA, if it has one."""
DORA_MAGNITUDE = "lora_magnitude_vector"
# The key of each LoRA's down (A) matrix in each layout: one per adapted module.
_DOWN_KEY = re.compile(r"(\.lora_A\.weight|\.lora\.down\.weight|\.lora_down\.weight)$")
# A LoRA matrix's key in any layout: the module, and whether it is the down (A) or the up (B) matrix.
_MATRIX_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")
_DOWN_PARTS = ("lora_A", "lora.down", "lora_down")
MAX_CONFIG_BYTES = 2**20


class AdapterError(RuntimeError):
    """An adapter was refused; the message says what is wrong with it and what still serves."""


@dataclass(frozen=True)
class AdapterFiles:
    name: str
    weights: Path
    """The file that serves."""
    config: Path | None
    twin: Path | None = None
    """The diffusers file beside a PEFT file: it must hold the same weights."""
    text_encoder: Path | None = None
    """A PEFT adapter's text encoder LoRA (`text_encoder/adapter_model.safetensors`), if it has one."""
    text_encoder_config: Path | None = None


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    layout: str
    version: str
    """First 12 hex digits of the SHA-256 of the files: the same files give the same version everywhere."""
    state_dict: dict[str, torch.Tensor]
    modules: int
    """How many modules the adapter's tensors adapt."""
    file: str
    """The name of the file that serves (and of its twin, which agrees with it)."""


def _inside(root: Path, path: Path, name: str) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        raise AdapterError(f"adapter {name!r} points outside LORA_DIR ({resolved}); links out of it are refused")
    return resolved


def locate_adapter(lora_dir: Path, name: str) -> AdapterFiles:
    """The files of adapter `name`: a folder `LORA_DIR/name/` or a file `LORA_DIR/name.safetensors`."""
    if not ADAPTER_NAME_PATTERN.match(name) or name == NO_ADAPTER:
        raise AdapterError(f"{name!r} is not a valid adapter name (letters, digits, '.', '_', '-'; no paths)")
    root = lora_dir.resolve()
    folder, single_file = lora_dir / name, lora_dir / f"{name}.safetensors"
    if single_file.is_file():
        return AdapterFiles(name, _inside(root, single_file, name), None)
    if not folder.is_dir():
        pickles = [p.name for p in lora_dir.glob(f"{name}.*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_refusal(name, pickles)
        raise AdapterError(f"adapter {name!r} not found in {lora_dir} (no folder {name}/ nor file {name}.safetensors)")
    folder = _inside(root, folder, name)
    if (folder / PEFT_WEIGHTS).is_file():
        config = folder / PEFT_CONFIG
        if not config.is_file():
            raise AdapterError(f"adapter {name!r} has {PEFT_WEIGHTS} but no {PEFT_CONFIG} beside it")
        twin = folder / DIFFUSERS_WEIGHTS
        text_encoder = text_encoder_config = None
        if (folder / TEXT_ENCODER_FOLDER / PEFT_WEIGHTS).is_file():
            text_encoder = _inside(root, folder / TEXT_ENCODER_FOLDER / PEFT_WEIGHTS, name)
            text_encoder_config = folder / TEXT_ENCODER_FOLDER / PEFT_CONFIG
            if not text_encoder_config.is_file():
                raise AdapterError(
                    f"adapter {name!r} has {TEXT_ENCODER_FOLDER}/{PEFT_WEIGHTS} but no {PEFT_CONFIG} beside it"
                )
            text_encoder_config = _inside(root, text_encoder_config, name)
        return AdapterFiles(
            name,
            _inside(root, folder / PEFT_WEIGHTS, name),
            _inside(root, config, name),
            _inside(root, twin, name) if twin.is_file() else None,
            text_encoder,
            text_encoder_config,
        )
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return AdapterFiles(name, _inside(root, folder / DIFFUSERS_WEIGHTS, name), None)
    candidates = sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return AdapterFiles(name, _inside(root, candidates[0], name), None)
    if len(candidates) > 1:
        raise AdapterError(
            f"adapter {name!r} holds several .safetensors files ({', '.join(p.name for p in candidates)}); "
            "keep one per adapter folder"
        )
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refusal(name, pickles)
    raise AdapterError(f"adapter {name!r} has no .safetensors weights in {folder}")


def _pickle_refusal(name: str, files: list[str]) -> AdapterError:
    return AdapterError(
        f"adapter {name!r} is a pickle file ({', '.join(files)}): loading pickle can run arbitrary code, so only "
        "safetensors are accepted. Convert it where you trust it, e.g. "
        "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter.safetensors')`."
    )


def list_adapters(lora_dir: Path) -> list[str]:
    """Names of the adapters in LORA_DIR (hidden entries, such as a trainer's half-written folder, skipped)."""
    if not lora_dir.is_dir():
        return []
    names = set()
    for entry in lora_dir.iterdir():
        if entry.name.startswith("."):
            continue
        name = entry.name.removesuffix(".safetensors") if entry.is_file() else entry.name
        if (entry.is_dir() or entry.suffix == ".safetensors") and ADAPTER_NAME_PATTERN.match(name):
            names.add(name)
    return sorted(names)


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """How much PEFT scales a LoRA's update (B @ A): alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA.
    The diffusers layout has it folded into the up (B) matrices."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _peft_to_diffusers(state_dict: dict[str, torch.Tensor], config: dict, model: str) -> dict[str, torch.Tensor]:
    """Rewrite PEFT keys for diffusers (under `model.`: unet, text_encoder) and fold PEFT's alpha / r scaling
    into the up (B) matrices."""
    alpha_pattern = config.get("alpha_pattern") or {}
    converted = {}
    for key, tensor in state_dict.items():
        module_key = key.removeprefix(PEFT_PREFIX)
        if module_key.endswith(".lora_B.weight"):
            module = module_key.removesuffix(".lora_B.weight")
            rank = tensor.shape[1]
            alpha = next(
                (value for pattern, value in alpha_pattern.items() if re.match(rf"(.*\.)?({pattern})$", module)),
                config.get("lora_alpha", rank),
            )
            tensor = tensor * lora_scaling(alpha, rank, bool(config.get("use_rslora")))
        converted[f"{model}.{module_key}"] = tensor
    return _magnitudes_for_transformers(converted) if model == "text_encoder" else converted


def _magnitudes_for_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DoRA's magnitude vectors keyed as transformers loads them into a text encoder (`….weight`): under
    peft's own key (no suffix) it loads nothing there, silently (checked with transformers 5.24)."""
    return {
        f"{key}.weight" if key.endswith(f".{DORA_MAGNITUDE}") else key: tensor for key, tensor in state_dict.items()
    }


def _read_file(name: str, path: Path, limit: int, setting: str) -> bytes:
    """A file's bytes, refused before reading when it is larger than `limit`."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise AdapterError(
                f"adapter {name!r}: {path.name} is {size / 2**20:,.0f} MiB, more than {setting} "
                f"({limit / 2**20:,.0f} MiB); an SD 1.x LoRA of rank 128 is about 150 MB"
            )
        return path.read_bytes()
    except OSError as error:
        raise AdapterError(f"adapter {name!r} could not be read: {error}") from error


def _load_tensors(name: str, path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(raw)
    except SafetensorError as error:
        raise AdapterError(
            f"adapter {name!r} is not a valid safetensors file ({path.name}: {error}); "
            "it may be truncated or corrupted"
        ) from error


def _check_matrices(name: str, file_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse, in words, tensors that cannot be LoRA weights, before any code indexes their shapes."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        where = f"adapter {name!r}: {file_name}: tensor {key!r}"
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{where} holds NaN or infinite values (a diverged training run?)")
        if key.endswith(".alpha") and tensor.numel() != 1:
            raise AdapterError(f"{where} has shape {tuple(tensor.shape)}; an alpha is one number")
        match = _MATRIX_KEY.match(key)
        if match is None:
            continue
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise AdapterError(f"{where} holds {dtype} values; a LoRA matrix holds floating-point numbers")
        if tensor.ndim not in (2, 4):
            raise AdapterError(
                f"{where} has shape {tuple(tensor.shape)}; a LoRA matrix has 2 dimensions (4 for a convolution)"
            )
        pairs.setdefault(match["module"], {})["down" if match["part"] in _DOWN_PARTS else "up"] = tensor
    for module, pair in pairs.items():
        if len(pair) != 2:
            missing = "up (B)" if "up" not in pair else "down (A)"
            raise AdapterError(f"adapter {name!r}: {file_name}: module {module!r} has no {missing} matrix")
        if pair["down"].shape[0] != pair["up"].shape[1]:
            raise AdapterError(
                f"adapter {name!r}: {file_name}: module {module!r} has a down matrix of rank {pair['down'].shape[0]} "
                f"but an up matrix of rank {pair['up'].shape[1]}"
            )


def _same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Whether two diffusers-keyed LoRAs hold the same matrices (older files spell `lora.down` for `lora_A`)."""

    def normalised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            key.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight"): tensor
            for key, tensor in state.items()
        }

    ours, theirs = normalised(ours), normalised(theirs)
    return set(ours) == set(theirs) and all(
        ours[key].shape == theirs[key].shape and torch.allclose(ours[key].float(), theirs[key].float(), atol=1e-6)
        for key in ours
    )


def _read_config(name: str, path: Path, raw: bytes) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as error:
        raise AdapterError(f"adapter {name!r} has an unreadable {path.name}: {error}") from error
    if not (
        isinstance(config, dict)
        and isinstance(config.get("lora_alpha", 1), (int, float))
        and isinstance(config.get("alpha_pattern") or {}, dict)
    ):
        raise AdapterError(f"adapter {name!r} has a {path.name} without a numeric lora_alpha")
    return config


def read_adapter(files: AdapterFiles, max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES) -> AdapterWeights:
    """Read and check an adapter's files without touching the pipeline (it may be rendering)."""
    raw = _read_file(files.name, files.weights, max_bytes, "MAX_ADAPTER_BYTES")
    config_bytes = b""
    if files.config is not None:
        config_bytes = _read_file(files.name, files.config, MAX_CONFIG_BYTES, "what a config needs")
    twin_raw = _read_file(files.name, files.twin, max_bytes, "MAX_ADAPTER_BYTES") if files.twin else b""
    text_raw = text_config_bytes = b""
    if files.text_encoder is not None:
        text_raw = _read_file(files.name, files.text_encoder, max_bytes, "MAX_ADAPTER_BYTES")
        text_config_bytes = _read_file(files.name, files.text_encoder_config, MAX_CONFIG_BYTES, "what a config needs")
    digest = hashlib.sha256()
    for part in (raw, config_bytes, twin_raw, text_raw, text_config_bytes):
        digest.update(part)
    state_dict = _load_tensors(files.name, files.weights, raw)
    config = _read_config(files.name, files.config, config_bytes) if files.config is not None else None
    if not state_dict:
        raise AdapterError(f"adapter {files.name!r} holds no tensors")
    _check_matrices(files.name, files.weights.name, state_dict)

    keys = list(state_dict)
    if any(key.startswith(PEFT_PREFIX) for key in keys):
        if config is None:
            raise AdapterError(f"adapter {files.name!r} has PEFT keys but no {PEFT_CONFIG} to give its alpha")
        layout, state_dict = "peft", _peft_to_diffusers(state_dict, config, "unet")
        if files.text_encoder is not None:
            where = f"{TEXT_ENCODER_FOLDER}/{files.text_encoder.name}"
            text_state = _load_tensors(files.name, files.text_encoder, text_raw)
            _check_matrices(files.name, where, text_state)
            if not text_state or not all(key.startswith(PEFT_PREFIX) for key in text_state):
                raise AdapterError(f"adapter {files.name!r}: {where} holds no PEFT keys ({PEFT_PREFIX}...)")
            text_config = _read_config(files.name, files.text_encoder_config, text_config_bytes)
            state_dict |= _peft_to_diffusers(text_state, text_config, "text_encoder")
    elif any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for key in keys):
        layout = "kohya"
    elif any(key.startswith(("unet.", "text_encoder.")) for key in keys):
        layout = "diffusers"
    else:
        raise AdapterError(
            f"adapter {files.name!r} is in no known LoRA layout (first key: {keys[0]!r}); expected PEFT "
            f"({PEFT_PREFIX}...), diffusers (unet....) or kohya (lora_unet_...) keys"
        )
    modules = _adapted_modules(state_dict)
    if modules == 0:
        raise AdapterError(f"adapter {files.name!r} holds no LoRA matrices (first key: {keys[0]!r})")
    file = files.weights.name
    if files.twin is not None:
        twin = _load_tensors(files.name, files.twin, twin_raw)
        _check_matrices(files.name, files.twin.name, twin)
        if not _same_weights(state_dict, twin):
            raise AdapterError(
                f"adapter {files.name!r} holds two layouts that disagree: {files.weights.name} (PEFT) and "
                f"{files.twin.name} (diffusers) hold different weights. Was only one of them replaced? Keep one "
                "file, or write both from the same weights"
            )
        file = f"{file} (= {files.twin.name})"
    return AdapterWeights(files.name, layout, digest.hexdigest()[:12], state_dict, modules, file)


def _lora_matrices(pipe, internal_name: str) -> dict[str, torch.nn.Parameter]:
    """One adapter's LoRA matrices in the pipeline, by the keys a diffusers-layout file gives them
    (`unet.<module>.lora_A.weight`): two per adapted module, and a DoRA adapter's magnitude vector
    (`unet.<module>.lora_magnitude_vector`; `….weight` in the text encoder, see `_magnitudes_for_transformers`)."""
    matrices = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for module_name, module in model.named_modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if lora_a is not None and internal_name in lora_a:
                matrices[f"{prefix}.{module_name}.lora_A.weight"] = lora_a[internal_name].weight
                matrices[f"{prefix}.{module_name}.lora_B.weight"] = lora_b[internal_name].weight
                magnitudes = getattr(module, DORA_MAGNITUDE, {})
                if internal_name in magnitudes:
                    suffix = ".weight" if prefix == "text_encoder" else ""
                    matrices[f"{prefix}.{module_name}.{DORA_MAGNITUDE}{suffix}"] = magnitudes[internal_name].weight
    return matrices


def _adapted_modules(state_dict: dict[str, torch.Tensor]) -> int:
    """How many modules a diffusers-keyed state dict adapts: one down matrix each."""
    return sum(1 for key in state_dict if _DOWN_KEY.search(key))


def _modules_of(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """The modules a diffusers-keyed state dict adapts (`unet.<module>.lora_A.weight` or `….lora.down.weight`
    → `unet.<module>`), by their matrices."""
    return {match["module"] for match in map(_MATRIX_KEY.match, state_dict) if match}


def _rank_of(state_dict: dict[str, torch.Tensor]) -> int:
    """The largest rank of a state dict's down matrices (their first dimension)."""
    ranks = [
        tensor.shape[0]
        for key, tensor in state_dict.items()
        if (m := _MATRIX_KEY.match(key)) and m["part"] in _DOWN_PARTS
    ]
    return max(ranks, default=0)


def _alpha_folded(weights: AdapterWeights) -> bool:
    """Whether the file's LoRA scaling is folded into its up matrices (diffusers then loads it at alpha = rank),
    as in the PEFT layout once read and in diffusers' own files; kohya files carry their alphas apart."""
    return weights.layout != "kohya" and not any(key.endswith(".alpha") for key in weights.state_dict)


Activation = tuple[tuple[str, float], ...]
"""The adapters a render uses, with their scales (empty: the base model alone)."""


class AdapterRegistry:
    """The adapters loaded in one pipeline, by name, each with the version it was loaded from.

    A new version of a loaded adapter whose modules and shapes fit is copied into the adapter's place
    (peft's hotswap: no module to inject, nothing for a compiled model to recompile), its previous tensors
    kept until the copy succeeded. Otherwise it loads under a fresh internal name next to the old one, and
    replaces it only once checked. Either way a refused version leaves the previous one serving.

    `activate` sets the LoRA layers for the next render, walking only those layers, and only when what they
    should do changes. The default adapter (`fuse`) is merged into the base weights while the renders use
    it alone, and the base weights restored from a copy when they use something else: merging and
    unmerging in fp16 would drift the base weights a little with every switch.

    All calls happen on the worker's job thread, between renders, so a running render is never disturbed.
    """

    def __init__(
        self,
        pipe,
        lora_dir: Path,
        max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        fuse: str | None = None,
        scales_as_tensors: bool = False,
    ) -> None:
        self.pipe = pipe
        self.lora_dir = lora_dir
        self.max_bytes = max_bytes
        self.fuse = fuse or None
        self.scales_as_tensors = scales_as_tensors
        """For a compiled pipeline: a scale that is a Python number is a constant of the compiled graph, and
        another value recompiles it; a tensor is an input, changed in place."""
        self._loaded: dict[str, AdapterInfo] = {}
        self._serial = 0
        self._matrices: dict[str, dict[str, torch.nn.Parameter]] = {}
        """Each loaded adapter's LoRA matrices by their file keys, where a reload may copy into them directly."""
        self._layers: list | None = None
        """Every LoRA layer of the pipeline (a cache: loading and discarding adapters changes them)."""
        self._active: Activation | None = None
        """What the layers are set to now (None: unknown, set them at the next activation)."""
        self._fused: Activation | None = None
        self._base_weights: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        """The base weights of the adapted layers (by id), with a copy of them before anything was merged."""

    @property
    def loaded(self) -> dict[str, AdapterInfo]:
        return dict(self._loaded)

    def load(self, name: str) -> AdapterInfo:
        """Load (or reload) adapter `name` from LORA_DIR. Raises AdapterError; the old version then stays."""
        try:
            weights = read_adapter(locate_adapter(self.lora_dir, name), self.max_bytes)
        except AdapterError as error:
            raise AdapterError(f"{error}{self._still_serving(name)}") from error
        current = self._loaded.get(name)
        if current is not None and current.version == weights.version:
            return current
        if current is not None and current.modules == weights.modules and self._swapped_in(current, weights):
            internal_name, adapted = current.internal_name, current.modules
            if not _alpha_folded(weights):
                self._matrices.pop(internal_name, None)  # its layers' scaling is the file's alpha now
        else:
            internal_name, adapted = self._load_beside(name, weights)
            if current is not None:
                self._discard(current.internal_name)
        loaded = AdapterInfo(
            name=name,
            internal_name=internal_name,
            layout=weights.layout,
            version=weights.version,
            modules=adapted,
            loaded_at=time.time(),
            file=weights.file,
        )
        self._loaded[name] = loaded
        logger.info(
            "adapter %s version %s loaded (%s layout, %d modules)", name, loaded.version, loaded.layout, adapted
        )
        return loaded

    def _swapped_in(self, current: AdapterInfo, weights: AdapterWeights) -> bool:
        """Copy a new version into the place of the old one; False where it does not fit (the old one then
        intact, or forgotten where diffusers' failed hotswap dropped it)."""
        self.unfuse()  # the merged weights are the old version's, and peft refuses to swap a merged adapter
        if self._copied(current, weights):
            return True
        # diffusers' hotswap drops the old version when it fails (below): what it cannot swap is not given to it.
        # It maps LoRA matrices only, not DoRA magnitudes, nor a text encoder's; it refuses modules the old
        # version did not adapt (in a kohya file, named otherwise, found only by trying); a rank above the
        # layers' (LORA_MAX_RANK with COMPILE) it swaps by replacing the tensors a compiled graph holds.
        matrices = _lora_matrices(self.pipe, current.internal_name)
        if any(DORA_MAGNITUDE in key or "dora_scale" in key for key in [*weights.state_dict, *matrices]):
            return self._not_swapped(current, "diffusers' hotswap does not swap DoRA magnitudes")
        if any(key.startswith(("text_encoder.", "lora_te")) for key in weights.state_dict):
            return self._not_swapped(current, "diffusers' hotswap does not swap a text encoder's LoRA")
        if _alpha_folded(weights) and not _modules_of(weights.state_dict) <= _modules_of(matrices):
            return self._not_swapped(current, "it adapts modules the old version does not")
        if _rank_of(weights.state_dict) > _rank_of(matrices):
            return self._not_swapped(current, "its rank is above the loaded layers'")
        kept = {key: tensor.detach().clone() for key, tensor in matrices.items()}
        try:
            self.pipe.load_lora_weights(weights.state_dict, adapter_name=current.internal_name, hotswap=True)
        except Exception as error:  # another rank or other modules: loaded beside it instead
            detail = " ".join(str(error).split())[:200] or type(error).__name__
            self._active = None
            if current.internal_name not in getattr(self.pipe.unet, "peft_config", {}):
                # A hotswap that fails inside diffusers drops the adapter it was swapping into (its config, and
                # its layers where it was active): the old version is gone, and what is left of it goes too. The
                # new one loads beside, or the name serves nothing (`load` then says so).
                logger.warning(
                    "adapter %s: not swapped in place (%s), and diffusers dropped its previous version; loading "
                    "the new one",
                    current.name,
                    detail,
                )
                self._loaded.pop(current.name, None)
                self._discard(current.internal_name)
                return False
            self._not_swapped(current, detail)
            tensors = _lora_matrices(self.pipe, current.internal_name)
            for key, tensor in kept.items():
                if key in tensors and tensors[key].shape == tensor.shape:
                    tensors[key].data.copy_(tensor)
            return False
        # peft's hotswap sets each layer's scaling to the new file's alpha / rank, but leaves its `lora_alpha`,
        # from which every later `set_scale` (ours and peft's) computes the scaling: make it the new one's.
        for layer in self.layers():
            if current.internal_name in getattr(layer, "scaling", {}):
                rank = layer.r[current.internal_name]
                root = math.sqrt(rank) if layer.use_rslora.get(current.internal_name) else rank
                layer.lora_alpha[current.internal_name] = float(layer.scaling[current.internal_name]) * root
        self._active = None  # the swap set the layers' scales back to the file's
        return True

    @staticmethod
    def _not_swapped(current: AdapterInfo, reason: str) -> bool:
        logger.info("adapter %s: not swapped in place (%s); loading it beside the old version", current.name, reason)
        return False

    def _copied(self, current: AdapterInfo, weights: AdapterWeights) -> bool:
        """The common reload, done directly: a file that names exactly the old version's LoRA matrices, with
        their shapes and its alpha folded in as the old one's was, is copied into them (~1 ms for SD v1-4's
        256 matrices). diffusers' hotswap, which also pads ranks and rescales, walks the model's state dict
        several times: ~70 ms on SD v1-4, more than a reload should take."""
        matrices = self._matrices.get(current.internal_name)
        state = weights.state_dict
        if matrices is None or not _alpha_folded(weights) or state.keys() != matrices.keys():
            return False
        if any(tensor.shape != matrices[key].shape for key, tensor in state.items()):
            return False
        with torch.no_grad():
            for key, tensor in state.items():
                matrices[key].copy_(tensor)
        return True

    def _load_beside(self, name: str, weights: AdapterWeights) -> tuple[str, int]:
        self._serial += 1
        # Of one length, so that no name holds another: peft's hotswap finds an adapter's tensors by substring,
        # and swapping `adapter1` zeroed `adapter10`'s.
        internal_name = f"adapter{self._serial:08d}"
        self.unfuse()
        self._layers = self._active = None
        try:
            self.pipe.load_lora_weights(weights.state_dict, adapter_name=internal_name)
        except Exception as error:  # whatever diffusers and peft raise on a file that does not fit
            self._discard(internal_name)
            detail = " ".join(str(error).split()) or type(error).__name__
            raise AdapterError(
                f"adapter {name!r} does not fit the base model ({detail[:240]}{'...' if len(detail) > 240 else ''}); "
                "it was probably trained for another base model" + self._still_serving(name)
            ) from error
        matrices = _lora_matrices(self.pipe, internal_name)
        adapted = _adapted_modules(matrices)
        if _alpha_folded(weights):
            self._matrices[internal_name] = matrices
        if adapted != weights.modules:
            self._discard(internal_name)
            raise AdapterError(
                f"adapter {name!r} does not fit the base model: only {adapted} of its {weights.modules} LoRA "
                "modules match a module of this model; it was probably trained for another base model"
                + self._still_serving(name)
            )
        return internal_name, adapted

    def _still_serving(self, name: str) -> str:
        current = self._loaded.get(name)
        return f"; version {current.version} keeps serving" if current else ""

    def _discard(self, internal_name: str) -> None:
        present = {name for names in self.pipe.get_list_adapters().values() for name in names}
        if internal_name in present:
            self.unfuse()
            self.pipe.delete_adapters(internal_name)
        else:  # what a failed diffusers hotswap leaves: the adapter's config gone, its tensors in the layers
            for layer in self.layers():
                if internal_name in getattr(layer, "lora_A", {}):
                    layer.delete_adapter(internal_name)
        self._matrices.pop(internal_name, None)
        self._layers = self._active = None

    # Activation ------------------------------------------------------------------------------

    def layers(self) -> list:
        """The pipeline's LoRA layers (peft's BaseTunerLayer)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            models = (self.pipe.unet, self.pipe.text_encoder)
            self._layers = [
                module for model in models for module in model.modules() if isinstance(module, BaseTunerLayer)
            ]
        return self._layers

    def activate(self, adapters: Activation) -> None:
        """Make the next render use these loaded adapters at their scales (none: the base model alone)."""
        adapters = tuple(adapters)
        if self.fuse is not None and len(adapters) == 1 and adapters[0][0] == self.fuse:
            if self._fused != adapters:
                self.unfuse()
                self._set(adapters)
                self._merge(adapters)
            return
        self.unfuse()
        if self._active != adapters:
            self._set(adapters)

    def _set(self, adapters: Activation) -> None:
        names = [self._loaded[name].internal_name for name, _ in adapters]
        for layer in self.layers():
            layer.enable_adapters(bool(names))
            if names:
                layer.set_adapter(names)
                for internal_name, (_, scale) in zip(names, adapters, strict=True):
                    _set_scale(layer, internal_name, scale, self.scales_as_tensors)
        self._active = adapters

    def _merge(self, adapters: Activation) -> None:
        names = [self._loaded[name].internal_name for name, _ in adapters]
        for layer in self.layers():
            if any(name in getattr(layer, "lora_A", {}) for name in names):
                weight = layer.get_base_layer().weight
                self._base_weights.setdefault(id(weight), (weight, weight.detach().clone()))
                layer.merge(adapter_names=names)
        self._fused = adapters
        logger.info("adapter %s fused into the base weights at scale %g", adapters[0][0], adapters[0][1])

    def unfuse(self) -> None:
        """Put the base weights back as they were (exactly: from the copy), if an adapter is fused."""
        if self._fused is None:
            return
        for weight, original in self._base_weights.values():
            weight.data.copy_(original)
        for layer in self.layers():
            layer.merged_adapters.clear()
        self._fused = None


def _set_scale(layer, internal_name: str, scale: float, as_tensor: bool) -> None:
    """A layer's scale for one adapter, as peft's `set_scale` computes it; as a tensor changed in place where
    the layer's scale is a tensor already (`enable_lora_hotswap`) or `as_tensor` asks it to become one."""
    if internal_name not in getattr(layer, "scaling", {}):
        return
    current = layer.scaling[internal_name]
    if not (as_tensor or isinstance(current, torch.Tensor)):
        layer.set_scale(internal_name, scale)
        return
    rank = layer.r[internal_name]
    value = (
        scale * layer.lora_alpha[internal_name] / (math.sqrt(rank) if layer.use_rslora.get(internal_name) else rank)
    )
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        weight = layer.lora_A[internal_name].weight
        layer.scaling[internal_name] = torch.tensor(value, device=weight.device, dtype=weight.dtype)


def save_adapter(
    folder: Path,
    lora_state: dict[str, torch.Tensor],
    config,
    kohya_file: str | None = None,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    text_encoder_config=None,
) -> None:
    """Write a LoRA (or DoRA) of the UNet, and optionally of the text encoder, in the layouts the ecosystem
    loads, side by side in `folder`:

    - PEFT (`adapter_model.safetensors` with `base_model.model.` keys + `adapter_config.json`, the text
      encoder's the same in `text_encoder/`), which `PeftModel.from_pretrained` and the seed project read;
    - diffusers (`pytorch_lora_weights.safetensors`, `unet.` and `text_encoder.` keys, alpha / r folded into
      the up matrices), which stock `pipe.load_lora_weights` reads;
    - with `kohya_file`, the kohya / A1111 single file (`lora_unet_...` / `lora_te_...` keys with their
      alphas, DoRA's magnitudes as `dora_scale`), which the A1111 web UI and ComfyUI load (a worker reads
      the PEFT files of the folder and ignores it).

    The states have PEFT's module keys (`...to_q.lora_A.weight`); the configs are peft LoraConfigs.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    parts = [("unet", lora_state, config, folder)]
    if text_encoder_state is not None:
        parts.append(("text_encoder", text_encoder_state, text_encoder_config, folder / TEXT_ENCODER_FOLDER))
    diffusers_state = {}
    for prefix, state, part_config, part_folder in parts:
        part_folder.mkdir(parents=True, exist_ok=True)
        tensors = {key: tensor.detach().to("cpu", torch.float32).contiguous() for key, tensor in state.items()}
        save_file({PEFT_PREFIX + key: t for key, t in tensors.items()}, part_folder / PEFT_WEIGHTS, {"format": "pt"})
        part_config.save_pretrained(part_folder)
        scaling = lora_scaling(part_config.lora_alpha, part_config.r, part_config.use_rslora)
        part_state = {
            f"{prefix}.{key}": tensor * scaling if ".lora_B." in key else tensor for key, tensor in tensors.items()
        }
        diffusers_state |= _magnitudes_for_transformers(part_state) if prefix == "text_encoder" else part_state
    save_file(diffusers_state, folder / DIFFUSERS_WEIGHTS, {"format": "pt"})
    if kohya_file is not None:
        save_file(_to_kohya(diffusers_state), folder / kohya_file, {"format": "pt"})


def _to_kohya(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converter for the LoRA matrices; DoRA's magnitude vectors, which it does not know, as the
    `dora_scale` of the same module in LyCORIS' per-output-channel shape (out_features, 1, ...), as peft
    decomposes. ComfyUI and Forge read that shape (normalising by the base weight's norm, not the merged
    weight's as LyCORIS and peft do: off by the ratio of the two norms); the A1111 web UI's built-in Lora
    extension knows only the per-input-channel shape and misreads it; diffusers' kohya loader drops
    `dora_scale` (it says so)."""
    from diffusers.utils import convert_state_dict_to_kohya

    magnitudes = {key: t for key, t in diffusers_state.items() if f".{DORA_MAGNITUDE}" in key}
    kohya = convert_state_dict_to_kohya({key: t for key, t in diffusers_state.items() if key not in magnitudes})
    for key, tensor in magnitudes.items():
        module = key.split(f".{DORA_MAGNITUDE}")[0]
        down = diffusers_state[f"{module}.lora_A.weight"]
        converted = convert_state_dict_to_kohya({f"{module}.lora_A.weight": down})
        (down_key,) = (name for name in converted if name.endswith(".lora_down.weight"))
        kohya[down_key.replace(".lora_down.weight", ".dora_scale")] = tensor.reshape(-1, *[1] * (down.ndim - 1))
    return {_kohya_text_encoder_name(key): tensor.contiguous() for key, tensor in kohya.items()}


def _kohya_text_encoder_name(key: str) -> str:
    """SD 1.x's kohya name for a text encoder module, `lora_te_text_model_encoder_layers_…` as A1111 writes
    it: diffusers' converter writes SDXL's `lora_te1_`, and transformers 5 dropped CLIPTextModel's
    `text_model.` from its module names."""
    if not key.startswith("lora_te1_"):
        return key
    module = key.removeprefix("lora_te1_")
    return "lora_te_" + (module if module.startswith("text_model_") else f"text_model_{module}")
