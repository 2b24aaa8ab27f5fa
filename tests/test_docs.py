"""The README's settings table is the documentation of every setting: it must not drift."""

from __future__ import annotations

import re

from bot.settings import BotSettings
from tests.helpers import REPO
from worker.settings import WorkerSettings


def test_every_setting_is_in_the_readme_table_with_its_default():
    readme = (REPO / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `?([^`|]*)`? \|", readme, flags=re.MULTILINE))
    fields = {**WorkerSettings.model_fields, **BotSettings.model_fields}
    for name, field in fields.items():
        assert name.upper() in rows, f"{name.upper()} is missing from the README's settings table"
        default = field.default
        shown = rows[name.upper()]
        if isinstance(default, bool):
            assert shown == str(default).lower(), name
        elif isinstance(default, (int, float, str)):
            assert shown == str(default), name
        elif default is None or field.default_factory is list:
            assert shown == "", name
