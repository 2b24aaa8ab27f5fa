"""Prompt weights as users type them in the A1111 web UI: `(word:1.3)`, `(word)` (×1.1), `[word]` (÷1.1),
nested groups multiplying, `\\(` for a literal parenthesis.

This reads that syntax into (text, weight) fragments; compel (in the worker) turns the fragments into
the text encoder's conditioning, weights and prompts beyond 77 tokens included. compel reads a syntax of
its own (`(word)1.3`, `word++`), not this one, so the reading is here; it needs no torch, so the bot
checks a prompt before the queue and says where a weight does not parse.

As in A1111, a closing bracket with nothing to close is text, and so are the brackets of `:)` and `:(`;
unlike A1111, which weights the rest of the prompt after an opening bracket never closed, that is refused
(where it is said), and so are A1111's `<lora:...>` tags, which this service takes as the `loras` option.
"""

from __future__ import annotations

import re

EMPHASIS = 1.1
"""What `(word)` multiplies a weight by, and `[word]` divides it by (as in A1111)."""
WEIGHT_RANGE = (0.0, 10.0)

_TOKENS = re.compile(
    r"""
    (?P<literal>\\[()\[\]\\] | [:;][()\[\]])  # \( \) \[ \] \\ and the smileys :) :( ;) : the characters
    | (?P<weight>:\s*(?P<number>[+-]?(?:\d+\.?\d*|\.\d+))\s*\))   # :1.3) closes a ( with its weight
    | (?P<lora><lora:[^>]*>)
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:;<]+|[:;<\\])
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
        kind, where, text = match.lastgroup, match.start() + 1, match.group()
        if kind == "literal":
            fragments.append([text[-1] if text.startswith("\\") else text, 1.0])
        elif kind == "text":
            fragments.append([text, 1.0])
        elif kind == "lora":
            raise PromptSyntaxError(
                f"the {text} at character {where} is A1111's way to add an adapter: give it as loras "
                "(as in flickr30k:0.8) instead"
            )
        elif kind == "open":
            opened.append((text, where, len(fragments)))
        else:
            closing = ")" if kind == "weight" else text
            expected = {"(": ")", "[": "]"}.get(opened[-1][0]) if opened else None
            if expected is None and kind == "close":
                fragments.append([text, 1.0])  # closes nothing: text, as in A1111
                continue
            if closing != expected:
                where_opened = f"the '{opened[-1][0]}' at character {opened[-1][1]}" if opened else "nothing"
                raise PromptSyntaxError(
                    f"the '{closing}' at character {where} closes {where_opened}"
                    + (f", which needs '{expected}'" if expected else "; write `\\(` for a parenthesis")
                )
            _, _, first = opened.pop()
            multiplier = float(match.group("number")) if kind == "weight" else None
            if multiplier is not None and not WEIGHT_RANGE[0] <= multiplier <= WEIGHT_RANGE[1]:
                raise PromptSyntaxError(
                    f"the weight {multiplier:g} at character {where} must be from {WEIGHT_RANGE[0]:g} to "
                    f"{WEIGHT_RANGE[1]:g}"
                )
            if multiplier is None:
                multiplier = EMPHASIS if closing == ")" else 1 / EMPHASIS
            for fragment in fragments[first:]:
                fragment[1] *= multiplier
                if fragment[1] > WEIGHT_RANGE[1]:
                    raise PromptSyntaxError(
                        f"the weights around character {where} multiply to {fragment[1]:g}; at most "
                        f"{WEIGHT_RANGE[1]:g}"
                    )
    if opened:
        bracket, start, _ = opened[-1]
        closing = ")" if bracket == "(" else "]"
        raise PromptSyntaxError(
            f"the '{bracket}' at character {start} is never closed; close it with '{closing}', "
            f"or write `\\{bracket}` for the character itself"
        )
    merged: list[tuple[str, float]] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return [(text, weight) for text, weight in merged if text.strip()]
