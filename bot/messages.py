"""What the bot shows: progress lines, the result embed, and the buttons under each message.

User text (prompts) is escaped before it goes into a message, so markdown and mentions in a prompt
render as typed and ping no one.
"""

from __future__ import annotations

import io
from typing import Any

import discord

from imagine.store import JobResult

PROMPT_PREVIEW_CHARS = 180
EMBED_DESCRIPTION_CHARS = 4000


def escape(text: str) -> str:
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def short_prompt(prompt: str) -> str:
    text = prompt if len(prompt) <= PROMPT_PREVIEW_CHARS else prompt[: PROMPT_PREVIEW_CHARS - 1] + "…"
    return escape(text)


def progress_text(prompt: str, event: dict[str, Any], wait_s: float | None = None) -> str:
    head = f"**{short_prompt(prompt)}**\n"
    kind = event["type"]
    if kind == "queued":
        estimate = f" (about {wait_s:.0f} s)" if wait_s is not None else ""
        note = f" {event['message']}" if event.get("message") else ""
        return head + f"⏳ Queued: position {event.get('position') or '?'}{estimate}.{note}"
    if kind == "started":
        return head + f"🎨 Rendering on `{event['worker']}`…"
    if kind == "step":
        return head + f"🎨 Rendering: step {event['step']}/{event['total']}"
    raise ValueError(f"not a progress event: {kind}")


def result_embed(result: JobResult, requester_id: int) -> discord.Embed:
    meta = result.meta
    prompt = escape(meta["prompt"])
    if len(prompt) > EMBED_DESCRIPTION_CHARS:
        prompt = prompt[: EMBED_DESCRIPTION_CHARS - 1] + "…"
    embed = discord.Embed(description=prompt, colour=discord.Colour.blurple())
    if meta.get("negative_prompt"):
        embed.add_field(name="Negative prompt", value=escape(meta["negative_prompt"])[:1000], inline=False)
    seeds = ", ".join(f"`{image['seed']}`" + (" (withheld)" if image["withheld"] else "") for image in meta["images"])
    embed.add_field(name="Seeds", value=seeds)
    embed.add_field(name="Steps", value=str(meta["num_inference_steps"]))
    embed.add_field(name="Guidance", value=f"{meta['guidance_scale']:g}")
    embed.add_field(name="Size", value=f"{meta['width']}×{meta['height']}")
    if meta["adapter"]:
        adapter = f"{meta['adapter']} ({meta['adapter_version']}) × {meta['adapter_scale']:g}"
    else:
        adapter = "none (base model)"
    embed.add_field(name="Adapter", value=adapter)
    embed.add_field(name="Scheduler", value=meta["scheduler"])
    embed.add_field(name="Worker", value=f"`{meta['worker']}`")
    embed.add_field(name="Time", value=f"{meta['render_s']:.1f} s render, {meta['queue_wait_s']:.1f} s in queue")
    embed.add_field(name="Requested by", value=f"<@{requester_id}>")
    for warning in meta.get("warnings", []):
        embed.add_field(name="Note", value=escape(warning)[:1000], inline=False)
    return embed


def result_files(result: JobResult) -> list[discord.File]:
    return [
        discord.File(io.BytesIO(png), filename=result.file_name(image)) for image, png in result.delivered_images()
    ]


def preview_file(png: bytes) -> discord.File:
    return discord.File(io.BytesIO(png), filename="preview.png")


def custom_id(action: str, job_id: str, owner_id: int, index: int | None = None) -> str:
    """`imagine:<action>:<owner>:<job>[:<image>]`: everything a button needs, even after a restart."""
    suffix = f":{index}" if index is not None else ""
    return f"imagine:{action}:{owner_id}:{job_id}{suffix}"


def progress_view(job_id: str, owner_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Cancel", style=discord.ButtonStyle.secondary, custom_id=custom_id("cancel", job_id, owner_id)
        )
    )
    return view


def result_view(result: JobResult, owner_id: int) -> discord.ui.View:
    job_id = result.meta["job_id"]
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Reroll",
            emoji="🎲",
            style=discord.ButtonStyle.primary,
            custom_id=custom_id("reroll", job_id, owner_id),
        )
    )
    for image in result.meta["images"]:
        if not image["withheld"]:
            view.add_item(
                discord.ui.Button(
                    label=f"Variations of {image['index'] + 1}",
                    style=discord.ButtonStyle.secondary,
                    custom_id=custom_id("vary", job_id, owner_id, image["index"]),
                )
            )
    view.add_item(
        discord.ui.Button(
            label="Delete",
            emoji="🗑️",
            style=discord.ButtonStyle.danger,
            custom_id=custom_id("delete", job_id, owner_id),
        )
    )
    return view
