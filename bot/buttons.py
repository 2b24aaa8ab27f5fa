"""The buttons under a job's message, and the views that hold them.

One `DynamicItem` class, as in discord.py's `examples/views/dynamic_counter.py`: its template parses a
button's custom id and `custom_id` writes it, in one place. The id carries the action, the requester,
the job and the image, so the buttons keep working after the bot restarts (no view state to keep).
"""

from __future__ import annotations

import logging
import re
from enum import StrEnum
from typing import TYPE_CHECKING

import discord

from bot.messages import reply_privately
from imagine.logs import job_context
from imagine.store import JobResult

if TYPE_CHECKING:
    from bot.cogs.jobs import JobsCog

logger = logging.getLogger(__name__)


class Action(StrEnum):
    CANCEL = "cancel"
    """Stop the job while it waits or renders (its requester or an admin)."""
    REROLL = "reroll"
    """The same options, a new seed, as a job of whoever clicks."""
    VARY = "vary"
    """The same options and the seeds right after one image's."""
    UPSCALE = "upscale"
    """One image at twice its size: img2img of it enlarged, at low strength (a "hires fix")."""
    VARY_SUBTLE = "subtle"
    """img2img of one image at a low strength, with new seeds."""
    VARY_STRONG = "strong"
    """img2img of one image at a high strength, with new seeds."""
    DELETE = "delete"
    """Delete the result's message (its requester or an admin)."""


_LOOKS = {
    Action.CANCEL: {"label": "Cancel", "style": discord.ButtonStyle.secondary},
    Action.REROLL: {"label": "Reroll", "emoji": "🎲", "style": discord.ButtonStyle.primary},
    Action.VARY: {"style": discord.ButtonStyle.secondary},
    Action.UPSCALE: {"emoji": "🔍", "style": discord.ButtonStyle.secondary},
    Action.VARY_SUBTLE: {"style": discord.ButtonStyle.secondary},
    Action.VARY_STRONG: {"style": discord.ButtonStyle.secondary},
    Action.DELETE: {"label": "Delete", "emoji": "🗑️", "style": discord.ButtonStyle.danger},
}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"imagine:(?P<action>{'|'.join(Action)}):(?P<owner>\d+):(?P<job>[0-9a-f]{{32}})(?::(?P<index>\d))?",
):
    def __init__(
        self, action: Action, owner_id: int, job_id: str, index: int | None = None, row: int | None = None
    ) -> None:
        self.action, self.owner_id, self.job_id, self.index = Action(action), owner_id, job_id, index
        looks = dict(_LOOKS[self.action])
        if index is not None:
            looks["label"] = {
                Action.VARY: f"Variations of {index + 1}",
                Action.UPSCALE: f"Upscale {index + 1}",
                Action.VARY_SUBTLE: f"Vary {index + 1} (subtle)",
                Action.VARY_STRONG: f"Vary {index + 1} (strong)",
            }[self.action]
        button = discord.ui.Button(custom_id=self.custom_id_of(action, owner_id, job_id, index), row=row, **looks)
        super().__init__(button)

    @staticmethod
    def custom_id_of(action: Action, owner_id: int, job_id: str, index: int | None = None) -> str:
        """`imagine:<action>:<owner>:<job>[:<image>]`: what the template reads back."""
        return f"imagine:{action}:{owner_id}:{job_id}" + (f":{index}" if index is not None else "")

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item, match: re.Match[str], /):
        index = match["index"]
        return cls(
            Action(match["action"]), int(match["owner"]), match["job"], int(index) if index is not None else None
        )

    async def callback(self, interaction: discord.Interaction) -> None:
        jobs: JobsCog = interaction.client.get_cog("Jobs")
        with job_context(self.job_id):
            try:
                await jobs.on_button(interaction, self)
            except Exception:
                logger.exception("button %s on job %s failed", self.action, self.job_id)
                await reply_privately(
                    interaction, "Something went wrong on our side; it has been logged. Try again in a moment."
                )


def progress_view(job_id: str, owner_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton(Action.CANCEL, owner_id, job_id))
    return view


IMAGE_ACTIONS = (Action.UPSCALE, Action.VARY_SUBTLE, Action.VARY_STRONG, Action.VARY)
"""The buttons of each image, on a row of its own (at most 4 images: 5 rows, Discord's limit)."""


def result_view(result: JobResult, owner_id: int) -> discord.ui.View:
    job_id = result.meta.job_id
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton(Action.REROLL, owner_id, job_id, row=0))
    view.add_item(JobButton(Action.DELETE, owner_id, job_id, row=0))
    for row, image in enumerate((image for image in result.meta.images if not image.withheld), start=1):
        for action in IMAGE_ACTIONS:
            view.add_item(JobButton(action, owner_id, job_id, image.index, row=row))
    return view
