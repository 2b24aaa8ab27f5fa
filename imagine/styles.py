"""Styles: named prompt templates an operator keeps in one TOML file (`STYLES_FILE`), for every front end.

    [cinematic]
    description = "A film still"
    prompt = "cinematic still of {prompt}, shallow depth of field, film grain"
    negative_prompt = "cartoon, drawing"
    num_inference_steps = 40          # defaults: any job option but prompt and image,
    adapters = [{name = "flickr30k", scale = 0.8}]   # used where the user gave none

A front end applies a style once, to what its user typed (`StyleBook.apply`): the job then holds the
prompt it expanded to and the style's name, so the worker, a Reroll or a Vary render the same without
the file. The file is read again whenever it changes; a file with a mistake leaves the previous
styles serving, and `error` says what is wrong (`imagine-admin styles`).
"""

from __future__ import annotations

import logging
import threading
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from imagine.contract import ADAPTER_NAME_PATTERN, JobOptions, JobRejected, Limits, parse_job_options
from imagine.prompts import PromptSyntaxError, weighted_fragments

logger = logging.getLogger(__name__)

PLACEHOLDER = "{prompt}"
NOT_DEFAULTS = ("prompt", "negative_prompt", "image", "strength", "style", "seed", "safety_checker")
"""Options a style cannot set a default for: its own fields, what belongs to one job, and the safety checker
(which stays as each front end's operator set it)."""


class StyleError(ValueError):
    """A styles file that cannot serve; the message names the style and the field."""


class Style(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    prompt: str
    """The template: `{prompt}` is where the user's prompt goes."""
    negative_prompt: str = ""
    """Put before the user's own negative prompt."""
    defaults: dict[str, Any] = {}
    """Job options used where the user gave none."""

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if value.count(PLACEHOLDER) != 1:
            raise ValueError(f"prompt must hold {PLACEHOLDER} once, where the user's prompt goes (got {value!r})")
        return value

    def expand(self, options: dict[str, Any]) -> dict[str, Any]:
        """The job's options with this style applied: its prompt put into the template, the style's negative
        prompt before the user's, the style's defaults where the user gave none, and the style's name."""
        given = {key: value for key, value in options.items() if value is not None}
        defaults = dict(self.defaults)
        if given.keys() & {"adapter", "adapters", "adapter_scale"}:  # the user's adapters replace the style's
            for key in ("adapter", "adapters", "adapter_scale"):
                defaults.pop(key, None)
        if given.get("image") is not None:  # an image keeps its own shape
            defaults.pop("width", None)
            defaults.pop("height", None)
        expanded = {**defaults, **given, "style": self.name}
        # str.replace, not str.format: a user's braces are text.
        expanded["prompt"] = self.prompt.replace(PLACEHOLDER, str(options.get("prompt", "")).strip())
        negatives = [self.negative_prompt.strip(), str(options.get("negative_prompt") or "").strip()]
        expanded["negative_prompt"] = ", ".join(part for part in negatives if part)
        return expanded


class StyleBook:
    """The styles of one file, read again when it changes (checked on each use: one `stat`)."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        self.error: str | None = None
        """What is wrong with the file as it is now; None while it serves as written."""
        self._styles: dict[str, Style] = {}
        self._seen: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def styles(self) -> dict[str, Style]:
        with self._lock:
            try:
                stat = self.path.stat()
                seen = (stat.st_mtime_ns, stat.st_size)
            except FileNotFoundError:
                seen = None
            if seen != self._seen:
                self._seen = seen
                self._reload(seen is not None)
            return self._styles

    def _reload(self, exists: bool) -> None:
        if not exists:
            self._styles, self.error = {}, None
            return
        try:
            self._styles = read_styles(self.path, self.limits)
            self.error = None
            logger.info("styles: %d read from %s", len(self._styles), self.path)
        except (OSError, StyleError) as error:
            self.error = str(error)
            logger.warning("styles: %s (the previous %d styles serve)", error, len(self._styles))

    def apply(self, options: dict[str, Any]) -> dict[str, Any]:
        """`options` with their `style` applied; unchanged without one. Raises JobRejected for an unknown style."""
        name = options.get("style")
        if name is None:
            return options
        if not isinstance(name, str):
            raise JobRejected(f"style must be a style's name (got {name!r})", "style")
        prompt = options.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise JobRejected("prompt must be a text that is not empty: the style goes around it", "prompt")
        if self.limits.prompt_weights:  # checked before it goes into the template: positions are the user's
            for option in ("prompt", "negative_prompt"):
                try:
                    weighted_fragments(str(options.get(option) or ""))
                except PromptSyntaxError as error:
                    raise JobRejected(f"{option}: {error}", option) from None
        styles = self.styles()
        if name not in styles:
            known = ", ".join(styles) or "none (the service has no styles)"
            raise JobRejected(f"style {name!r} is not a style of this service; the styles are: {known}", "style")
        return styles[name].expand(options)


def read_styles(path: Path, limits: Limits) -> dict[str, Style]:
    """Every style of a file, each checked: its fields, its template, and its defaults against the contract."""
    try:
        tables = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise StyleError(f"{path}: not valid TOML: {error}") from None
    styles = {}
    for name, table in tables.items():
        if not ADAPTER_NAME_PATTERN.match(name):
            raise StyleError(f"{path}: style {name!r}: a name is letters, digits, '.', '_' or '-' (at most 64)")
        if not isinstance(table, dict):
            raise StyleError(f'{path}: style {name!r} must be a table ([{name}] with prompt = "... {{prompt}} ...")')
        fields = {key: table[key] for key in ("description", "prompt", "negative_prompt") if key in table}
        defaults = {key: value for key, value in table.items() if key not in fields}
        refused = sorted(set(defaults) & set(NOT_DEFAULTS)) or sorted(set(defaults) - set(JobOptions.model_fields))
        if refused:
            raise StyleError(
                f"{path}: style {name!r}: {refused[0]!r} cannot be a style's default; the defaults are job options "
                f"but {', '.join(NOT_DEFAULTS)}"
            )
        try:
            style = Style(name=name, **fields, defaults=defaults)
            parse_job_options(style.expand({"prompt": "a test"}), limits)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise StyleError(f"{path}: style {name!r}: {where}: {first['msg']}") from None
        except JobRejected as error:
            raise StyleError(f"{path}: style {name!r}: {error}") from None
        styles[name] = style
    return styles
