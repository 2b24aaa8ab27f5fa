"""The Discord bot's class: its dependencies, its extensions (one cog per concern), command sync, and the
one place that turns a command's error into a reply.

  bot/cogs/imagine.py  /imagine
  bot/cogs/jobs.py     submitting, following and delivering jobs; the buttons' clicks
  bot/cogs/admin.py    /reload-adapter, /adapters, /queue
  bot/buttons.py       the buttons under a job's message (their ids survive restarts)
  bot/checks.py        who is an admin
"""

from __future__ import annotations

import hashlib
import json
import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.buttons import JobButton
from bot.messages import reply_privately
from bot.settings import BotSettings
from imagine.client import ImagineClient
from imagine.contract import JobRejected
from imagine.store import REDIS_UNREACHABLE

logger = logging.getLogger(__name__)

EXTENSIONS = ("bot.cogs.jobs", "bot.cogs.imagine", "bot.cogs.admin")


class ImagineBot(commands.Bot):
    def __init__(self, settings: BotSettings, service: ImagineClient) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        # Mentions are off unless a message turns one on (the requester, when a result needs a ping).
        super().__init__(
            command_prefix=commands.when_mentioned, intents=intents, allowed_mentions=discord.AllowedMentions.none()
        )
        self.settings = settings
        self.service = service
        """The image service (its client), as `interaction.client` is this bot."""
        self.tree.on_error = self.on_app_command_error

    async def setup_hook(self) -> None:
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        self.add_dynamic_items(JobButton)
        await self.sync_commands()

    async def sync_commands(self) -> None:
        """Sync the commands to DISCORD_GUILD_IDS (instant) or globally, only when they changed since the last
        sync (Discord rate-limits syncs, and global ones take up to an hour to show)."""
        records = self.service.records()
        scopes = [discord.Object(guild_id) for guild_id in self.settings.discord_guild_ids] or [None]
        for guild in scopes:
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            payload = [command.to_dict(self.tree) for command in self.tree.get_commands(guild=guild)]
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            scope = f"{self.application_id}:{guild.id if guild else 'global'}"
            if records.get("synced", scope) == digest:
                logger.info("commands for %s unchanged; not syncing", guild.id if guild else "all servers")
                continue
            await self.tree.sync(guild=guild)
            records.put("synced", scope, digest, ttl_s=None)
            logger.info("synced %d commands to %s", len(payload), guild.id if guild else "all servers (global)")

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError):
        """Known errors become an ephemeral message saying what to do; the rest are logged."""
        cause = getattr(error, "original", error)
        if isinstance(cause, JobRejected):
            message = f"⚠️ {cause}"
        elif isinstance(cause, REDIS_UNREACHABLE):
            logger.warning(
                "command %s: Redis is not answering (%s)", interaction.command and interaction.command.name, cause
            )
            message = "⏳ The image service is not answering right now; try again in a minute."
        elif isinstance(error, app_commands.CheckFailure):
            message = f"⛔ {error}"
        else:
            logger.error("command %s failed", interaction.command and interaction.command.name, exc_info=cause)
            message = "Something went wrong on our side; it has been logged. Try again in a moment."
        await reply_privately(interaction, message)
