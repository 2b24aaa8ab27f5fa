"""The README's settings table is the documentation of every setting: it must not drift."""

from __future__ import annotations

import re

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from bot.settings import BotSettings
from tests.helpers import REPO
from web.settings import WebSettings
from worker.settings import WorkerSettings


def settings_by_environment_variable(*settings_classes: type[BaseSettings]) -> dict[str, FieldInfo]:
    """Each setting of these classes under the environment variable that sets it (pydantic-settings reads the
    field's alias, or the class's env_prefix and the field's name, case-insensitively)."""
    fields = {}
    for settings_class in settings_classes:
        prefix = settings_class.model_config.get("env_prefix", "")
        for name, field in settings_class.model_fields.items():
            alias = field.validation_alias if isinstance(field.validation_alias, str) else None
            fields[(alias or prefix + name).upper()] = field
    return fields


def documented_default(field: FieldInfo) -> str | None:
    """A setting's default as the docs write it: `true`/`false`, the number or text, nothing for none or an empty
    list; None where the docs may word it freely (paths, required settings)."""
    default = field.default
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, (int, float, str)):
        return str(default)
    if default is None or field.default_factory is list:
        return ""
    return None


def test_every_setting_is_in_the_readme_table_with_its_default():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `?([^`|]*)`? \|", readme, flags=re.MULTILINE))
    for name, field in settings_by_environment_variable(WorkerSettings, BotSettings, WebSettings).items():
        assert name in rows, f"{name} is missing from the README's settings table"
        if documented_default(field) is not None:
            assert rows[name] == documented_default(field), name
