"""`/imagine`: the command people use. Its ranges come from the service's limits (settings), so they are
declared here without `from __future__ import annotations`: discord.py reads them as real objects."""

import asyncio
import time

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import ImagineBot
from bot.messages import escape
from imagine.contract import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NO_ADAPTER,
    SCHEDULERS,
    JobRejected,
    default,
    parse_adapter_list,
)
from imagine.images import aspect_sizes
from imagine.styles import StyleBook

ADAPTER_NAMES_TTL_S = 10.0


def build_imagine_command(cog: "ImagineCog") -> app_commands.Command:
    limits = cog.bot.service.settings.limits
    ranges = limits.ranges()
    sizes = aspect_sizes(limits.min_side, limits.max_side, limits.max_pixels)
    max_steps = ranges["num_inference_steps"][1]
    max_images = ranges["num_images_per_prompt"][1]
    min_guidance, max_guidance = ranges["guidance_scale"]
    min_scale, max_scale = ranges["adapter_scale"]

    @app_commands.command(name="imagine", description="Draw an image from a text prompt.")
    @app_commands.guild_only()
    @app_commands.describe(
        prompt="What to draw.",
        negative_prompt="What to keep out of the image.",
        steps=f"Denoising steps, 1 to {max_steps} (default {default('num_inference_steps')}): more is slower, finer.",
        guidance=f"How closely to follow the prompt, {min_guidance:g} to {max_guidance:g} "
        f"(default {default('guidance_scale')}).",
        aspect="Image shape (default 1:1, 512×512; with an image: the image's own).",
        seed=f"Seed of the first image, 0 to {MAX_SEED} (default random): the same seed redraws the same image.",
        count=f"Number of images, 1 to {max_images} (default {default('num_images_per_prompt')}).",
        adapter=f"LoRA adapter (default: the Flickr30k one; '{NO_ADAPTER}' for the base model).",
        adapter_scale=f"Adapter strength, {min_scale:g} to {max_scale:g} (default {default('adapter_scale'):g}).",
        loras=f"Several adapters blended, as flickr30k:0.8, style:0.5 (at most "
        f"{cog.bot.service.settings.max_adapters}; instead of adapter).",
        scheduler="Sampler (default: the model's own).",
        image="An image to start from (PNG, JPEG or WebP): the prompt redraws it.",
        style="A style: a template around your prompt, with its own defaults (/styles lists them).",
        strength=f"How far to move from the image, 0 to 1 (default {default('strength')}): low stays close to it.",
    )
    @app_commands.choices(
        aspect=[app_commands.Choice(name=f"{ratio} ({w}×{h})", value=ratio) for ratio, (w, h) in sizes.items()],
        scheduler=[app_commands.Choice(name=name, value=name) for name in SCHEDULERS],
    )
    @app_commands.autocomplete(adapter=cog.adapter_names, loras=cog.lora_list, style=cog.style_names)
    async def imagine(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        negative_prompt: app_commands.Range[str, 0, MAX_PROMPT_CHARS] | None = None,
        steps: app_commands.Range[int, 1, max_steps] | None = None,
        guidance: app_commands.Range[float, min_guidance, max_guidance] | None = None,
        aspect: str | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        count: app_commands.Range[int, 1, max_images] | None = None,
        adapter: str | None = None,
        adapter_scale: app_commands.Range[float, min_scale, max_scale] | None = None,
        loras: app_commands.Range[str, 1, 400] | None = None,
        scheduler: str | None = None,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.0, 1.0] | None = None,
        style: app_commands.Range[str, 1, 64] | None = None,
    ) -> None:
        # Discord does not enforce declared ranges or choices: the shared contract checks everything again.
        options = {"prompt": prompt, "seed": seed, "adapter": adapter}
        for name, value in (
            ("negative_prompt", negative_prompt),
            ("num_inference_steps", steps),
            ("guidance_scale", guidance),
            ("num_images_per_prompt", count),
            ("adapter_scale", adapter_scale),
            ("scheduler", scheduler),
            ("strength", strength),
        ):
            if value is not None:
                options[name] = value
        if aspect is not None:
            if aspect not in sizes:
                await interaction.response.send_message(
                    f"⚠️ aspect must be one of {', '.join(sizes)} (got {aspect!r})", ephemeral=True
                )
                return
            options["width"], options["height"] = sizes[aspect]
        if image is not None and image.size > limits.max_image_bytes:  # refused before it is downloaded
            await interaction.response.send_message(
                f"⚠️ image is {image.size / 2**20:.1f} MiB; at most {limits.max_image_bytes / 2**20:.1f} MiB: "
                "send a smaller file",
                ephemeral=True,
            )
            return
        jobs = cog.bot.get_cog("Jobs")
        if loras is not None:
            try:
                options["adapters"] = parse_adapter_list(loras)
            except JobRejected as refusal:
                await interaction.response.send_message(f"⚠️ {refusal}", ephemeral=True)
                return
        if image is not None:
            # Fetching and checking up to MAX_IMAGE_BYTES may outlast Discord's 3 s to answer: say "thinking".
            await interaction.response.defer(thinking=True)
            try:
                options["image"] = await image.read()  # the contract checks what it is
            except discord.HTTPException as error:
                await jobs.refuse(interaction, f"the image could not be downloaded from Discord ({error.status})")
                return
        if style is not None:
            options["style"] = style
        try:
            options = cog.styles.apply(options)
        except JobRejected as refusal:
            await jobs.refuse(interaction, str(refusal))
            return
        nsfw = isinstance(interaction.channel, discord.abc.GuildChannel) and interaction.channel.is_nsfw()
        if nsfw and cog.bot.settings.allow_unfiltered_nsfw:
            options["safety_checker"] = False
        await jobs.submit(interaction, options)

    return imagine


class ImagineCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self._adapter_names: list[str] = []
        self._adapter_names_at = 0.0
        self.styles = StyleBook(bot.settings.styles_file, bot.settings.limits)
        bot.tree.add_command(build_imagine_command(self))

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command("imagine")

    @app_commands.command(name="styles", description="The styles /imagine offers.")
    @app_commands.guild_only()
    async def styles(self, interaction: discord.Interaction) -> None:
        styles = self.styles.styles()
        lines = [
            f"**{style.name}**" + (f" — {escape(style.description)}" if style.description else "")
            + f"\n`{style.prompt}`"
            for style in styles.values()
        ]  # fmt: skip
        text = "\n".join(lines) or "This service has no styles."
        await interaction.response.send_message(text[:2000], ephemeral=True)

    async def style_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = [name for name in self.styles.styles() if current.lower() in name.lower()]
        return [app_commands.Choice(name=name, value=name) for name in names[:25]]

    async def adapter_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """The adapters the online workers have loaded, and 'none'."""
        names = [*await self._loaded_adapters(), NO_ADAPTER]
        matching = [name for name in names if current.lower() in name.lower()]
        return [app_commands.Choice(name=name, value=name) for name in matching[:25]]

    async def lora_list(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        """The list typed so far, its last entry completed with each loaded adapter that matches it."""
        typed, comma, last = current.rpartition(",")
        head = f"{typed}, " if comma else ""
        fragment = last.strip().partition(":")[0].lower()
        given = {part.strip().partition(":")[0] for part in typed.split(",")} if comma else set()
        names = [name for name in await self._loaded_adapters() if fragment in name.lower() and name not in given]
        # A choice's name and value are at most 100 characters.
        choices = [f"{head}{name}:1.0" for name in names if len(head) + len(name) + 4 <= 100]
        return [app_commands.Choice(name=choice, value=choice) for choice in choices[:25]]

    async def _loaded_adapters(self) -> list[str]:
        if time.monotonic() - self._adapter_names_at > ADAPTER_NAMES_TTL_S:
            workers = await asyncio.to_thread(self.bot.service.workers)
            self._adapter_names = sorted({name for status in workers.values() for name in status.adapters})
            self._adapter_names_at = time.monotonic()
        return self._adapter_names


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ImagineCog(bot))
