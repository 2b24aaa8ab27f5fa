"""Who is an admin of the bot: checked by the bot on every admin command and admin-only button.

`default_permissions` only hides a command from others in Discord's client (a permission override can
show it again); this check is what refuses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.settings import BotSettings


def is_admin(interaction: discord.Interaction, settings: BotSettings) -> bool:
    """ADMIN_USER_IDS, a role of ADMIN_ROLE_IDS, or Manage Server (unless ADMINS_BY_MANAGE_GUILD=false)."""
    user = interaction.user
    if user.id in settings.admin_user_ids:
        return True
    if any(role.id in settings.admin_role_ids for role in getattr(user, "roles", [])):
        return True
    return settings.admins_by_manage_guild and interaction.permissions.manage_guild


def admins_only():
    """An app command check: the command answers "for the bot's admins" (ephemerally) to anyone else."""

    async def predicate(interaction: discord.Interaction) -> bool:
        if not is_admin(interaction, interaction.client.settings):
            raise app_commands.CheckFailure("This command is for the bot's admins.")
        return True

    return app_commands.check(predicate)
