"""The Discord bot: its class, admin rights, command sync, and the persistent job buttons."""

from __future__ import annotations

import hashlib
import json
import logging
import re

import discord
from discord import app_commands
from discord.ext import commands

from bot.deliveries import DeliveryStore
from bot.jobs import JobRunner
from bot.limits import UserLimits
from bot.settings import BotSettings
from imagine.client import ImagineClient
from imagine.contract import JobRejected
from imagine.logs import job_context
from imagine.store import REDIS_UNREACHABLE

logger = logging.getLogger(__name__)


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"imagine:(?P<action>cancel|reroll|vary|delete)"
    r":(?P<owner>\d+):(?P<job>[0-9a-f]{32})(?::(?P<index>\d))?",
):
    """Every button under a job's message. The custom id carries the action, the requester and the job,
    so the buttons keep working after the bot restarts."""

    def __init__(self, action: str, owner_id: int, job_id: str, index: int | None) -> None:
        from bot.messages import custom_id

        super().__init__(discord.ui.Button(custom_id=custom_id(action, job_id, owner_id, index)))
        self.action, self.owner_id, self.job_id, self.index = action, owner_id, job_id, index

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item, match: re.Match[str], /):
        index = match["index"]
        return cls(match["action"], int(match["owner"]), match["job"], int(index) if index is not None else None)

    async def callback(self, interaction: discord.Interaction) -> None:
        with job_context(self.job_id):
            try:
                await interaction.client.jobs.on_button(
                    interaction, self.action, self.owner_id, self.job_id, self.index
                )
            except Exception:
                logger.exception("button %s on job %s failed", self.action, self.job_id)
                message = "Something went wrong on our side; it has been logged. Try again in a moment."
                if interaction.response.is_done():
                    await interaction.followup.send(message, ephemeral=True)
                else:
                    await interaction.response.send_message(message, ephemeral=True)


class ImagineBot(commands.Bot):
    def __init__(self, settings: BotSettings, client: ImagineClient) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        # Mentions are off unless a message turns one on (the requester, when a result needs a ping).
        super().__init__(
            command_prefix=commands.when_mentioned, intents=intents, allowed_mentions=discord.AllowedMentions.none()
        )
        self.settings = settings
        self.client = client
        self.jobs = JobRunner(
            self,
            client,
            DeliveryStore(client.store),
            UserLimits(client, settings.max_pending_per_user, settings.user_cooldown_s),
        )
        self.tree.on_error = self.on_app_command_error

    async def setup_hook(self) -> None:
        await self.load_extension("bot.cogs.imagine")
        await self.load_extension("bot.cogs.admin")
        self.add_dynamic_items(JobButton)
        await self.sync_commands()
        resumed = self.jobs.resume_all()
        if resumed:
            logger.info("following %d jobs not yet delivered", resumed)

    async def close(self) -> None:
        await self.jobs.stop()
        await super().close()

    def is_admin(self, interaction: discord.Interaction) -> bool:
        """Checked by the bot on every admin call: `default_permissions` is only a hint to Discord's client."""
        user = interaction.user
        if user.id in self.settings.admin_user_ids:
            return True
        roles = getattr(user, "roles", [])
        if any(role.id in self.settings.admin_role_ids for role in roles):
            return True
        return self.settings.admins_by_manage_guild and interaction.permissions.manage_guild

    async def sync_commands(self) -> None:
        """Sync the commands to DISCORD_GUILD_IDS (instant) or globally, only when they changed since the last
        sync (Discord rate-limits syncs, and global ones take up to an hour to show)."""
        scopes = [discord.Object(guild_id) for guild_id in self.settings.discord_guild_ids] or [None]
        for guild in scopes:
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            payload = [command.to_dict(self.tree) for command in self.tree.get_commands(guild=guild)]
            digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
            key = self.client.store.key(
                "bot", "synced", str(self.application_id), str(guild.id if guild else "global")
            )
            if self.client.store.redis.get(key) == digest.encode():
                logger.info("commands for %s unchanged; not syncing", guild.id if guild else "all servers")
                continue
            await self.tree.sync(guild=guild)
            self.client.store.redis.set(key, digest)
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
        if interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)
