"""Styles from the operator's TOML file: applied to what a user typed, read again when the file changes, and a
file with a mistake leaves the previous styles serving and says what is wrong."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from imagine.contract import JobRejected, Limits, parse_job_options
from imagine.styles import StyleBook, read_styles
from tests.helpers import REPO, run_cli, service_settings

LIMITS = Limits()
CINEMATIC = """
[cinematic]
description = "A wide film still"
prompt = "cinematic still of {prompt}, film grain"
negative_prompt = "cartoon"
width = 680
height = 384
num_inference_steps = 40
adapters = [{name = "flickr30k", scale = 0.8}]
"""


def write(path: Path, text: str) -> None:
    """Write the file so that its change shows even within the file system's timestamp granularity."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


@pytest.fixture
def book(tmp_path) -> StyleBook:
    path = tmp_path / "styles.toml"
    write(path, CINEMATIC)
    return StyleBook(path, LIMITS)


def test_a_style_wraps_the_prompt_and_fills_in_what_the_user_left_out(book):
    options = parse_job_options(
        book.apply(
            {
                "prompt": "a dog {not a field}",
                "style": "cinematic",
                "negative_prompt": "blurry",
                "num_inference_steps": 12,
            }
        ),
        LIMITS,
    )
    assert options.prompt == "cinematic still of a dog {not a field}, film grain"  # a user's braces are text
    assert options.negative_prompt == "cartoon, blurry" and options.style == "cinematic"
    assert (options.width, options.height, options.num_inference_steps) == (680, 384, 12)  # the user's steps win
    assert [(choice.name, choice.scale) for choice in options.adapters] == [("flickr30k", 0.8)]
    # The user's adapter replaces the style's adapters (instead of a refusal for giving both).
    assert (
        parse_job_options(book.apply({"prompt": "a dog", "style": "cinematic", "adapter": "none"}), LIMITS).adapters
        is None
    )
    # Applied once: the stored job (a Reroll, the worker) is not expanded again.
    assert parse_job_options(options.model_dump(), LIMITS).prompt == options.prompt
    assert book.apply({"prompt": "no style"}) == {"prompt": "no style"}


def test_an_unknown_style_is_refused_with_the_styles_there_are(book):
    with pytest.raises(JobRejected, match=r"style 'noir' is not a style of this service; the styles are: cinematic"):
        book.apply({"prompt": "a dog", "style": "noir"})


def test_an_edited_file_serves_at_once_and_a_broken_edit_keeps_the_previous_styles(book):
    assert list(book.styles()) == ["cinematic"]
    write(book.path, CINEMATIC + '\n[noir]\nprompt = "{prompt}, film noir"\n')
    assert list(book.styles()) == ["cinematic", "noir"] and book.error is None

    write(book.path, '[noir]\nprompt = "no placeholder"\n')
    assert list(book.styles()) == ["cinematic", "noir"]  # the previous styles serve
    assert "style 'noir': prompt: Value error, prompt must hold {prompt} once" in book.error
    write(book.path, '[noir]\nprompt = "{prompt}, film noir"\n')
    assert list(book.styles()) == ["noir"] and book.error is None
    book.path.unlink()
    assert book.styles() == {} and book.error is None  # no file: no styles


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[a\nprompt = 1", r"not valid TOML"),
        ('[x]\nprompt = "plain"', r"style 'x': prompt: Value error, prompt must hold \{prompt\} once"),
        ('[x]\ndescription = "no template"', r"style 'x': prompt: Field required"),
        ('[x]\nprompt = "{prompt}"\nsteps = 20', r"style 'x': 'steps' cannot be a style's default"),
        ('[x]\nprompt = "{prompt}"\nseed = 3', r"style 'x': 'seed' cannot be a style's default"),
        ('[x]\nprompt = "{prompt}"\nnum_inference_steps = 1000', r"style 'x': num_inference_steps must be an integer"),
        ('[x]\nprompt = "{prompt} (unclosed"', r"style 'x': prompt: the '\(' at character \d+ is never closed"),
        ('["../x"]\nprompt = "{prompt}"', r"style '../x': a name is letters"),
        ("x = 3", r"style 'x' must be a table"),
    ],
)
def test_a_style_with_a_mistake_is_refused_saying_which_and_why(tmp_path, text, message):
    path = tmp_path / "styles.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_styles(path, LIMITS)


def test_the_shipped_styles_are_valid():
    assert {"photo", "cinematic", "watercolor"} <= set(read_styles(REPO / "styles.toml", LIMITS))


def test_imagine_admin_styles_lists_them_and_says_what_is_wrong(tmp_path):
    path = tmp_path / "styles.toml"
    write(path, CINEMATIC)
    settings = service_settings("redis://127.0.0.1:1/0", f"y{uuid.uuid4().hex[:8]}", styles_file=path)
    listed = run_cli(settings, "imagine-admin", "styles")
    assert listed.returncode == 0, listed.stderr
    assert (
        "cinematic: cinematic still of {prompt}, film grain (negative: cartoon); defaults width=680" in listed.stdout
    )
    write(path, '[x]\nprompt = "plain"\n')
    broken = run_cli(settings, "imagine-admin", "styles")
    assert broken.returncode == 1 and "ERROR: " in broken.stdout and "style 'x'" in broken.stdout
