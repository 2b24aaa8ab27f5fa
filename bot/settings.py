"""Settings of the bot process: the shared ones plus Discord's."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from imagine.settings import FrontEndSettings

IdList = Annotated[list[int], NoDecode]


class BotSettings(FrontEndSettings):
    discord_token: SecretStr = Field(description="The bot's token (Developer Portal > Bot). Never logged.")
    discord_guild_ids: IdList = Field(
        default_factory=list, description="Servers to sync commands to at once (comma-separated); empty: global."
    )
    admin_role_ids: IdList = Field(default_factory=list, description="Roles whose members are admins.")
    admin_user_ids: IdList = Field(default_factory=list, description="Users who are admins.")
    admins_by_manage_guild: bool = Field(True, description="Members with the Manage Server permission are admins.")
    admins_exempt_from_limits: bool = Field(True, description="Admins skip the per-user limit and cooldown.")
    max_pending_per_user: int = Field(2, ge=1, description="Jobs one user may have queued or running at once.")
    user_cooldown_s: float = Field(10.0, ge=0, description="Least time between two submissions of one user.")
    allow_unfiltered_nsfw: bool = Field(
        False, description="In channels marked NSFW, ask for no safety checker (workers must allow it too)."
    )
    progress_edit_interval_s: float = Field(
        1.5, gt=0, description="Least time between two edits of a progress message."
    )
    reload_timeout_s: float = Field(30.0, gt=0, description="How long /reload-adapter waits for the workers' answers.")
    delivery_claim_s: float = Field(
        30.0,
        ge=3,
        description="How long a bot's right to deliver a job lasts (renewed while it delivers): after a crash "
        "mid-delivery, a restarted bot takes the job over this soon.",
    )
    discord_api_base: str | None = Field(
        None, description="Another Discord REST base (a test double); unset for Discord."
    )
    discord_gateway_url: str | None = Field(
        None, description="Another gateway URL (a test double); unset for Discord."
    )

    @field_validator("discord_guild_ids", "admin_role_ids", "admin_user_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [int(part) for part in value.replace(" ", "").split(",") if part]
        return value
