"""`/imagine`: the command people use. Its ranges come from the service's limits (settings), so they are
declared here without `from __future__ import annotations`: discord.py reads them as real objects."""

import asyncio
import time

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import ImagineBot
from imagine.contract import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    NO_ADAPTER,
    SCHEDULERS,
    JobRejected,
    default,
    parse_adapter_list,
)

SIZES = {"square": (512, 512), "portrait": (512, 768), "landscape": (768, 512)}
ADAPTER_NAMES_TTL_S = 10.0


def build_imagine_command(cog: "ImagineCog") -> app_commands.Command:
    ranges = cog.bot.service.settings.limits.ranges()
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
        size="Image shape (default square, 512×512).",
        seed=f"Seed of the first image, 0 to {MAX_SEED} (default random): the same seed redraws the same image.",
        count=f"Number of images, 1 to {max_images} (default {default('num_images_per_prompt')}).",
        adapter=f"LoRA adapter (default: the Flickr30k one; '{NO_ADAPTER}' for the base model).",
        adapter_scale=f"Adapter strength, {min_scale:g} to {max_scale:g} (default {default('adapter_scale'):g}).",
        loras=f"Several adapters blended, as flickr30k:0.8, style:0.5 (at most "
        f"{cog.bot.service.settings.max_adapters}; instead of adapter).",
        scheduler="Sampler (default: the model's own).",
    )
    @app_commands.choices(
        size=[app_commands.Choice(name=f"{name} ({w}×{h})", value=name) for name, (w, h) in SIZES.items()],
        scheduler=[app_commands.Choice(name=name, value=name) for name in SCHEDULERS],
    )
    @app_commands.autocomplete(adapter=cog.adapter_names, loras=cog.lora_list)
    async def imagine(
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
        negative_prompt: app_commands.Range[str, 0, MAX_PROMPT_CHARS] | None = None,
        steps: app_commands.Range[int, 1, max_steps] | None = None,
        guidance: app_commands.Range[float, min_guidance, max_guidance] | None = None,
        size: str | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        count: app_commands.Range[int, 1, max_images] | None = None,
        adapter: str | None = None,
        adapter_scale: app_commands.Range[float, min_scale, max_scale] | None = None,
        loras: app_commands.Range[str, 1, 400] | None = None,
        scheduler: str | None = None,
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
        ):
            if value is not None:
                options[name] = value
        if size is not None:
            if size not in SIZES:
                await interaction.response.send_message(
                    f"⚠️ size must be one of {', '.join(SIZES)} (got {size!r})", ephemeral=True
                )
                return
            options["width"], options["height"] = SIZES[size]
        if loras is not None:
            try:
                options["adapters"] = parse_adapter_list(loras)
            except JobRejected as refusal:
                await interaction.response.send_message(f"⚠️ {refusal}", ephemeral=True)
                return
        nsfw = isinstance(interaction.channel, discord.abc.GuildChannel) and interaction.channel.is_nsfw()
        if nsfw and cog.bot.settings.allow_unfiltered_nsfw:
            options["safety_checker"] = False
        await cog.bot.get_cog("Jobs").submit(interaction, options)

    return imagine


class ImagineCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self._adapter_names: list[str] = []
        self._adapter_names_at = 0.0
        bot.tree.add_command(build_imagine_command(self))

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command("imagine")

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
