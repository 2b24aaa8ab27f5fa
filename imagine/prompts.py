"""Prompt weights as users type them in the A1111 web UI: `(word:1.3)`, `(word)` (×1.1), `[word]` (÷1.1),
nested groups multiplying, `\\(` for a literal parenthesis.

This reads that syntax into (text, weight) fragments; compel (in the worker) turns the fragments into
the text encoder's conditioning, weights and prompts beyond 77 tokens included. compel reads a syntax of
its own (`(word)1.3`, `word++`), not this one, so the reading is here; it needs no torch, so the bot
checks a prompt before the queue and says where a weight does not parse.
"""

from __future__ import annotations

import re

EMPHASIS = 1.1
"""What `(word)` multiplies a weight by, and `[word]` divides it by (as in A1111)."""
WEIGHT_RANGE = (0.0, 10.0)

_TOKENS = re.compile(
    r"""
    (?P<literal>\\[()\[\]\\])             # \( \) \[ \] \\ : the character itself
    | (?P<weight>:\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))\s*\))   # :1.3) closes a ( with its weight
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|[:\\])
    """,
    re.VERBOSE,
)


class PromptSyntaxError(ValueError):
    """A prompt whose weights do not parse; the message says where (1-based character) and what to write."""


def weighted_fragments(prompt: str) -> list[tuple[str, float]]:
    """The prompt's text in fragments, each with its weight, neighbours of equal weight merged. A prompt
    without weights is one fragment at 1.0. Raises PromptSyntaxError."""
    fragments: list[list] = []
    opened: list[tuple[str, int, int]] = []  # the bracket, where it is, the first fragment it covers
    for match in _TOKENS.finditer(prompt):
        kind, where = match.lastgroup, match.start() + 1
        if kind in ("literal", "text"):
            fragments.append([match.group()[-1] if kind == "literal" else match.group(), 1.0])
        elif kind == "open":
            opened.append((match.group(), where, len(fragments)))
        else:
            closing = ")" if kind == "weight" else match.group()
            if not opened:
                raise PromptSyntaxError(
                    f"the '{closing}' at character {where} closes nothing; write \\{closing} for the character itself"
                )
            bracket, start, first = opened.pop()
            expected = ")" if bracket == "(" else "]"
            if closing != expected:
                raise PromptSyntaxError(
                    f"the '{closing}' at character {where} closes the '{bracket}' at character {start}, "
                    f"which needs '{expected}'"
                )
            if kind == "weight":
                multiplier = float(match.group("number"))
                low, high = WEIGHT_RANGE
                if not low <= multiplier <= high:
                    raise PromptSyntaxError(
                        f"the weight {multiplier:g} at character {where} must be from {low:g} to {high:g}"
                    )
            else:
                multiplier = EMPHASIS if bracket == "(" else 1 / EMPHASIS
            for fragment in fragments[first:]:
                fragment[1] *= multiplier
    if opened:
        bracket, start, _ = opened[-1]
        closing = ")" if bracket == "(" else "]"
        raise PromptSyntaxError(
            f"the '{bracket}' at character {start} is never closed; close it with '{closing}', "
            f"or write \\{bracket} for the character itself"
        )
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return [(text, weight) for text, weight in merged if text.strip()]
