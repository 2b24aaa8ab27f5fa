"""What the bot shows: progress lines, the result embed, and its private replies.

User text (prompts) is escaped before it goes into a message, so markdown and mentions in a prompt
render as typed and ping no one.
"""

from __future__ import annotations

import contextlib
import io

import discord

from imagine.store import JobResult
from imagine.wire import JobEvent, Queued, Started, Step

PROMPT_PREVIEW_CHARS = 180
EMBED_DESCRIPTION_CHARS = 4000


def escape(text: str) -> str:
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def short_prompt(prompt: str) -> str:
    text = prompt if len(prompt) <= PROMPT_PREVIEW_CHARS else prompt[: PROMPT_PREVIEW_CHARS - 1] + "…"
    return escape(text)


def with_prompt(prompt: str, line: str) -> str:
    """A job's message: its prompt in bold, then what there is to say about it."""
    return f"**{short_prompt(prompt)}**\n{line}"


def progress_text(prompt: str, event: JobEvent, wait_s: float | None = None) -> str:
    match event:
        case Queued():
            estimate = f" (about {wait_s:.0f} s)" if wait_s is not None else ""
            note = f" {event.message}" if event.message else ""
            return with_prompt(prompt, f"⏳ Queued: position {event.position or '?'}{estimate}.{note}")
        case Started():
            return with_prompt(prompt, f"🎨 Rendering on `{event.worker}`…")
        case Step():
            return with_prompt(prompt, f"🎨 Rendering: step {event.step}/{event.total}")
    raise ValueError(f"not a progress event: {event.type}")


def result_embed(result: JobResult, requester_id: int) -> discord.Embed:
    meta = result.meta
    prompt = escape(meta.prompt)
    if len(prompt) > EMBED_DESCRIPTION_CHARS:
        prompt = prompt[: EMBED_DESCRIPTION_CHARS - 1] + "…"
    embed = discord.Embed(description=prompt, colour=discord.Colour.blurple())
    if meta.negative_prompt:
        embed.add_field(name="Negative prompt", value=escape(meta.negative_prompt)[:1000], inline=False)
    seeds = ", ".join(f"`{image.seed}`" + (" (withheld)" if image.withheld else "") for image in meta.images)
    embed.add_field(name="Seeds", value=seeds)
    embed.add_field(name="Steps", value=str(meta.num_inference_steps))
    embed.add_field(name="Guidance", value=f"{meta.guidance_scale:g}")
    embed.add_field(name="Size", value=f"{meta.width}×{meta.height}")
    if meta.style is not None:
        embed.add_field(name="Style", value=meta.style)
    if meta.init_image is not None:
        embed.add_field(name="Started from", value=f"an image (`{meta.init_image}`) at strength {meta.strength:g}")
    if meta.adapters:  # each adapter of a blend with its version and scale
        adapter = ", ".join(f"{use.name} ({use.version}) × {use.scale:g}" for use in meta.adapters)
    elif meta.adapter:  # a result of a worker from before blends
        adapter = f"{meta.adapter} ({meta.adapter_version}) × {meta.adapter_scale:g}"
    else:
        adapter = "none (base model)"
    embed.add_field(name="Adapters" if len(meta.adapters) > 1 else "Adapter", value=adapter)
    embed.add_field(name="Scheduler", value=meta.scheduler)
    embed.add_field(name="Worker", value=f"`{meta.worker}`")
    embed.add_field(name="Time", value=f"{meta.render_s:.1f} s render, {meta.queue_wait_s:.1f} s in queue")
    embed.add_field(name="Requested by", value=f"<@{requester_id}>")
    for warning in meta.warnings:
        embed.add_field(name="Note", value=escape(warning)[:1000], inline=False)
    return embed


def result_files(result: JobResult) -> list[discord.File]:
    return [
        discord.File(io.BytesIO(png), filename=result.file_name(image)) for image, png in result.delivered_images()
    ]


def preview_file(png: bytes) -> discord.File:
    return discord.File(io.BytesIO(png), filename="preview.png")


async def reply_privately(interaction: discord.Interaction, text: str, **options) -> None:
    """An ephemeral answer, whether or not the interaction was answered already. Answered with a public
    "thinking" placeholder (a deferral), the answer replaces it: the placeholder goes."""
    if interaction.response.is_done():
        if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
        await interaction.followup.send(text, ephemeral=True, **options)
    else:
        await interaction.response.send_message(text, ephemeral=True, **options)
