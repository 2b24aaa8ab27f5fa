"""Admin commands: hot-reload adapters on every worker, list adapters, look at the queue and its numbers."""

from __future__ import annotations

import asyncio

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import ImagineBot
from bot.checks import admins_only
from imagine.admin import format_adapters, format_queue, format_reload

DISCORD_MESSAGE_CHARS = 2000


def as_code_block(text: str) -> str:
    limit = DISCORD_MESSAGE_CHARS - 8
    if len(text) > limit:
        text = text[: limit - 2] + "\n…"
    return f"```\n{text}\n```"


class AdminCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="reload-adapter", description="Hot-reload a LoRA adapter (or all) on every worker.")
    @app_commands.describe(name="Adapter to reload; all adapters when left out.")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admins_only()
    async def reload_adapter(self, interaction: discord.Interaction, name: str | None = None) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        outcome = await asyncio.to_thread(
            self.bot.service.reload_adapters, name, timeout_s=self.bot.settings.reload_timeout_s
        )
        await interaction.followup.send(as_code_block(format_reload(outcome)), ephemeral=True)

    @app_commands.command(name="adapters", description="The adapters on each worker, their versions, the default.")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admins_only()
    async def adapters(self, interaction: discord.Interaction) -> None:
        text = await asyncio.to_thread(format_adapters, self.bot.service)
        await interaction.response.send_message(as_code_block(text), ephemeral=True)

    @app_commands.command(
        name="queue", description="Queue depth, workers, render and wait times, failures, adapter loads."
    )
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    @admins_only()
    async def queue(self, interaction: discord.Interaction) -> None:
        text = await asyncio.to_thread(format_queue, self.bot.service)
        await interaction.response.send_message(as_code_block(text), ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(AdminCog(bot))
