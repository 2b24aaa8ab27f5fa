"""Jobs from Discord: submit, follow with live edits, deliver once, and the buttons under the messages.

The cog owns its followers (one asyncio task per job) the way RoboDanny's reminder cog owns its timer:
they start in `cog_load` (every job not yet delivered, after a restart) and stop in `cog_unload`, where
a delivery under way is finished first. The result never depends on the interaction token (it lives 15
minutes): where each job goes is kept in Redis, its message is edited while the token is good, and
otherwise the result is posted into the channel, mentioning only the requester.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands

from bot import messages
from bot.buttons import Action, JobButton, progress_view, result_view
from bot.checks import is_admin
from bot.deliveries import INTERACTION_TOKEN_LIFETIME_S, Delivery, DeliveryStore
from imagine.contract import JobOptions, JobRejected, parse_job_options
from imagine.followups import upscale_options, vary_options
from imagine.limits import UserLimits
from imagine.logs import job_context
from imagine.store import REDIS_UNREACHABLE
from imagine.wire import TERMINAL_EVENTS, Cancelled, Done, Failed, JobEvent, Queued, Step

if TYPE_CHECKING:
    from bot.app import ImagineBot

logger = logging.getLogger(__name__)

POLL_S = 0.5
REDIS_RETRY_S = 2.0
STOP_GRACE_S = 30.0
"""How long a stopping bot waits for the deliveries under way to finish."""


class JobsCog(commands.Cog, name="Jobs"):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.service = bot.service
        self.settings = bot.settings
        self.deliveries = DeliveryStore(
            self.service.records(), self.service.settings.result_ttl_s, self.settings.delivery_claim_s
        )
        self.limits = UserLimits(
            self.service.records(), self.settings.max_pending_per_user, self.settings.user_cooldown_s
        )
        self._followers: dict[str, asyncio.Task] = {}
        self._delivering: set[str] = set()
        """Jobs whose outcome is being delivered right now: a stop lets them finish."""
        self._stopping = False

    async def cog_load(self) -> None:
        """Follow again every job not yet delivered (after a restart): finished ones are delivered now."""
        pending = await asyncio.to_thread(self.deliveries.pending)
        for delivery in pending:
            self.follow(delivery)
        if pending:
            logger.info("following %d jobs not yet delivered", len(pending))

    async def cog_unload(self) -> None:
        """Stop following jobs; a delivery under way is finished first (for up to STOP_GRACE_S)."""
        self._stopping = True
        followers = list(self._followers.items())
        if not followers:
            return
        for job_id, task in followers:
            if job_id not in self._delivering:
                task.cancel()
        _, unfinished = await asyncio.wait([task for _, task in followers], timeout=STOP_GRACE_S)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*(task for _, task in followers), return_exceptions=True)

    # Submitting ------------------------------------------------------------------------------

    async def submit(self, interaction: discord.Interaction, options: dict[str, Any]) -> None:
        """Check, enqueue, acknowledge and follow one job for the user of `interaction`.

        The job is recorded (with the queue cap and the user's pending limit checked in the same atomic
        step) before the interaction is answered, so that a refusal is always the first answer, and
        ephemeral: only the requester sees it, however many submissions of theirs race. (A job with an
        image to fetch is answered "thinking" first: its refusal then replaces that.)"""
        user_id = interaction.user.id
        limited = not (self.settings.admins_exempt_from_limits and is_admin(interaction, self.settings))
        try:
            # In a thread: an image to start from is decoded, which would hold the event loop up.
            checked = await asyncio.to_thread(parse_job_options, options, self.service.settings.limits)
            if limited:
                await asyncio.to_thread(self.limits.admit, user_id)
        except JobRejected as refusal:
            await self.refuse(interaction, str(refusal))
            return
        delivery = Delivery(
            job_id=self.service.new_job_id(),
            user_id=user_id,
            channel_id=interaction.channel_id,
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            token_expires_at=interaction.created_at.timestamp() + INTERACTION_TOKEN_LIFETIME_S,
        )
        with job_context(delivery.job_id):
            await self._enqueue(interaction, checked, delivery, self.limits.max_pending if limited else None)

    async def _enqueue(
        self, interaction: discord.Interaction, checked: JobOptions, delivery: Delivery, max_pending: int | None
    ) -> None:
        # Remembered before the job exists: a bot that dies right after submitting still delivers it.
        await asyncio.to_thread(self.deliveries.save, delivery)
        owner = str(interaction.user.id)
        try:
            job = await asyncio.to_thread(self.service.submit, checked, owner, delivery.job_id, max_pending)
        except JobRejected as refusal:  # the queue, or the user's share of it, is full
            await asyncio.to_thread(self.deliveries.remove, delivery.job_id)
            if max_pending is not None:
                await asyncio.to_thread(self.limits.forgive, interaction.user.id)
            await self.refuse(interaction, str(refusal))
            return
        logger.info("job %s submitted by user %s", job.job_id, interaction.user.id)
        text = messages.progress_text(checked.prompt, Queued(position=job.position))
        view = progress_view(job.job_id, delivery.user_id)
        try:
            if interaction.response.is_done():  # deferred ("thinking") while its image was fetched and checked
                message = await interaction.edit_original_response(content=text, view=view)
            else:
                await interaction.response.send_message(text, view=view)
                message = await interaction.original_response()
            delivery.message_id = message.id
            await asyncio.to_thread(self.deliveries.save, delivery)
        except discord.HTTPException as error:
            logger.warning(
                "job %s: no message to edit (%s); the result will go to the channel", job.job_id, error.status
            )
        self.follow(delivery)

    async def refuse(self, interaction: discord.Interaction, reason: str) -> None:
        """A refusal only its user sees: the first answer, or in place of a deferral's "thinking"."""
        await messages.reply_privately(interaction, f"⚠️ {reason}")

    # Following -------------------------------------------------------------------------------

    def follow(self, delivery: Delivery) -> None:
        if delivery.job_id not in self._followers and not self._stopping:
            # The task copies the context it is created in: its log lines carry the job id.
            with job_context(delivery.job_id):
                task = asyncio.create_task(self._follow(delivery), name=f"follow-{delivery.job_id}")
            self._followers[delivery.job_id] = task
            task.add_done_callback(lambda _: self._followers.pop(delivery.job_id, None))

    async def _follow(self, delivery: Delivery) -> None:
        prompt: str | None = None
        # Waits for Redis as long as it takes: giving up would leave the job undelivered until a restart.
        follower = self.service.follower(delivery.job_id, outage_s=None)
        # The terminal event, once read: kept until its delivery succeeds (the cursor is already past it).
        ending: JobEvent | None = None
        latest: JobEvent | None = None
        preview: bytes | None = None
        last_edit = 0.0
        failures = 0
        while True:
            try:
                if prompt is None:
                    job = await asyncio.to_thread(self.service.job, delivery.job_id)
                    if job is None:
                        await asyncio.to_thread(self.deliveries.remove, delivery.job_id)
                        return
                    prompt = job.options["prompt"]
                if ending is None:
                    for event in await asyncio.to_thread(follower.poll):
                        if event.type in TERMINAL_EVENTS:
                            ending = event
                            break
                        latest = event
                        if isinstance(event, Step) and event.preview_png:
                            preview = base64.b64decode(event.preview_png)
                    if follower.outage.away:
                        # Redis restarting: the job's events wait in its stream. Look again soon, not after a
                        # backoff that would hold the result back long after Redis is back.
                        await asyncio.sleep(REDIS_RETRY_S)
                        continue
                if ending is not None:
                    if failures and await asyncio.to_thread(self.service.job, delivery.job_id) is None:
                        logger.warning("job %s: expired (RESULT_TTL_S) before it could be delivered", delivery.job_id)
                        await asyncio.to_thread(self.deliveries.remove, delivery.job_id)
                        return
                    await self._finish(delivery, prompt, ending)
                    return
                if latest is not None and time.monotonic() - last_edit >= self.settings.progress_edit_interval_s:
                    await self._show_progress(delivery, prompt, latest, preview)
                    latest, preview, last_edit = None, None, time.monotonic()
                failures = 0
            except LookupError as error:  # its record expired, or Redis restarted without its data
                logger.warning("job %s: %s; not following it any more", delivery.job_id, error)
                if prompt is not None and delivery.editable:
                    lost = messages.with_prompt(prompt, "❌ The service lost this job; use /imagine again.")
                    with contextlib.suppress(discord.HTTPException):
                        await self._webhook(delivery).edit_message(delivery.message_id, content=lost, view=None)
                await asyncio.to_thread(self.deliveries.remove, delivery.job_id)
                return
            except REDIS_UNREACHABLE as error:  # reading the job, or delivering: the same outage as the events'
                follower.outage.failed(error)
                await asyncio.sleep(REDIS_RETRY_S)
                continue
            except Exception:
                # Discord refusing (a channel the bot may not post in) or away, or an error of ours: keep the
                # job and try again, more slowly each time, until the result expires (RESULT_TTL_S).
                failures += 1
                logger.exception("job %s: following failed (%d in a row)", delivery.job_id, failures)
                await asyncio.sleep(min(60.0, POLL_S * 2**failures))
                continue
            await asyncio.sleep(POLL_S)

    async def _show_progress(self, delivery: Delivery, prompt: str, event: JobEvent, preview: bytes | None) -> None:
        if not delivery.editable:
            return  # progress goes through the interaction token only; the result does not need it
        wait_s = None
        if isinstance(event, Queued) and event.position:
            wait_s = (await asyncio.to_thread(self.service.queue_stats)).estimated_wait_s(event.position)
        attachments = [messages.preview_file(preview)] if preview else discord.utils.MISSING
        with contextlib.suppress(discord.HTTPException):
            await self._webhook(delivery).edit_message(
                delivery.message_id,
                content=messages.progress_text(prompt, event, wait_s),
                attachments=attachments,
                view=progress_view(delivery.job_id, delivery.user_id),
            )

    # Delivering ------------------------------------------------------------------------------

    async def _finish(self, delivery: Delivery, prompt: str, event: JobEvent) -> None:
        while not await asyncio.to_thread(self.deliveries.claim, delivery.job_id):
            # Another bot process is delivering it, or died doing so: its claim then runs out unrenewed.
            if await asyncio.to_thread(self.deliveries.get, delivery.job_id) is None:
                return  # it delivered the job
            await asyncio.sleep(REDIS_RETRY_S)
        self._delivering.add(delivery.job_id)
        # The claim is short, and renewed while the delivery runs: after a crash mid-delivery, a restarted bot
        # takes the job over within DELIVERY_CLAIM_S instead of waiting out a long claim.
        renewal = asyncio.create_task(self._renew_claim(delivery.job_id))
        try:
            await self._deliver_outcome(delivery, prompt, event)
        except BaseException:
            await asyncio.to_thread(self.deliveries.release, delivery.job_id)  # let the retry deliver it
            raise
        finally:
            renewal.cancel()
            self._delivering.discard(delivery.job_id)
        await asyncio.to_thread(self.deliveries.remove, delivery.job_id)
        logger.info("job %s delivered (%s)", delivery.job_id, event.type)

    async def _renew_claim(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.deliveries.claim_s / 3)
            with contextlib.suppress(*REDIS_UNREACHABLE):  # the next renewal tries again
                await asyncio.to_thread(self.deliveries.renew_claim, job_id)

    async def _deliver_outcome(self, delivery: Delivery, prompt: str, event: JobEvent) -> None:
        match event:
            case Done():
                result = await asyncio.to_thread(self.service.result, delivery.job_id)
                if result is None:  # delivered already (another bot process) or expired
                    return
                await self._deliver(
                    delivery,
                    content="",
                    channel_note="your images are ready",
                    embed=messages.result_embed(result, delivery.user_id),
                    files=lambda: messages.result_files(result),
                    view=result_view(result, delivery.user_id),
                )
            case Failed():
                text = messages.with_prompt(prompt, f"❌ The job failed: {messages.escape(event.message)}")
                await self._deliver(delivery, content=text, channel_note="your job failed")
            case Cancelled():
                if delivery.editable:
                    with contextlib.suppress(discord.HTTPException):
                        await self._webhook(delivery).edit_message(
                            delivery.message_id, content=messages.with_prompt(prompt, "🚫 Cancelled."), view=None
                        )
        await asyncio.to_thread(self.service.confirm_delivery, delivery.job_id)

    async def _deliver(
        self, delivery: Delivery, content: str, channel_note: str, embed=None, files=None, view=None
    ) -> None:
        """Edit the job's message while the token is good; else post in the channel for the requester."""
        if delivery.editable:
            try:
                await self._webhook(delivery).edit_message(
                    delivery.message_id,
                    content=content or None,
                    embed=embed,
                    attachments=files() if files else [],
                    view=view,
                )
                return
            except discord.HTTPException as error:
                logger.warning(
                    "job %s: editing its message failed (%s); posting in the channel", delivery.job_id, error.status
                )
        channel = self.bot.get_partial_messageable(delivery.channel_id)
        requester = discord.Object(delivery.user_id)
        await channel.send(
            content=f"<@{delivery.user_id}> {channel_note}" + (f"\n{content}" if content else ""),
            embed=embed,
            files=files() if files else discord.utils.MISSING,
            view=view or discord.utils.MISSING,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=[requester]),
            # Discord drops a second message with the same nonce, should a crash make us post twice.
            nonce=delivery.job_id[:25],
        )

    def _webhook(self, delivery: Delivery) -> discord.Webhook:
        return discord.Webhook.partial(delivery.application_id, delivery.interaction_token, client=self.bot)

    # Buttons ---------------------------------------------------------------------------------

    async def on_button(self, interaction: discord.Interaction, button: JobButton) -> None:
        """What a click on a job's button does; the button's id says which job, whose, and which image."""
        action, job_id = button.action, button.job_id
        allowed = interaction.user.id == button.owner_id or is_admin(interaction, self.settings)
        if action in (Action.CANCEL, Action.DELETE) and not allowed:
            await interaction.response.send_message(
                f"Only <@{button.owner_id}> or an admin can {action} this.",
                ephemeral=True,
                allowed_mentions=discord.AllowedMentions.none(),
            )
            return
        if action is Action.CANCEL:
            outcome = await asyncio.to_thread(self.service.cancel, job_id)
            answer = {"cancelled": "Cancelled.", "cancelling": "Stopping it at the next step."}.get(
                outcome, f"Too late to cancel: the job is {outcome}."
            )
            await interaction.response.send_message(answer, ephemeral=True)
        elif action is Action.DELETE:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.message.delete()
            await interaction.followup.send("Deleted.", ephemeral=True)
        else:
            record = await asyncio.to_thread(self.service.job, job_id)
            if record is None:
                await interaction.response.send_message(
                    "This job is too old to reroll; use /imagine again.", ephemeral=True
                )
                return
            options = dict(record.options)
            if action is Action.REROLL:
                options["seed"] = None
            elif action is Action.VARY:
                # Seeds near the image's own, past every seed of its job and of its siblings' variations.
                count = options["num_images_per_prompt"]
                options["seed"] = options["seed"] + count * (button.index + 1)
            else:
                options = await self._from_image(interaction, button, options)
                if options is None:
                    return
            await self.submit(interaction, options)

    async def _from_image(
        self, interaction: discord.Interaction, button: JobButton, options: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The job an Upscale or Vary button asks for, from the image it sits beside. The image is read back
        from the message (the service lets a result go once it is delivered); None, answered, when the
        image is gone or cannot be upscaled."""
        prefix = f"{button.job_id}-{button.index}-"  # JobResult.file_name
        attachment = next((a for a in interaction.message.attachments if a.filename.startswith(prefix)), None)
        if attachment is None:
            await self.refuse(interaction, "This image is no longer on the message; use /imagine again.")
            return None
        await interaction.response.defer(thinking=True)  # fetching and checking it may outlast Discord's 3 s
        try:
            png = await attachment.read()
        except discord.HTTPException as error:
            await self.refuse(interaction, f"the image could not be downloaded from Discord ({error.status})")
            return None
        try:
            if button.action is not Action.UPSCALE:
                return vary_options(options, png, str(button.action))
            return upscale_options(options, png, options["seed"] + button.index, self.service.settings.limits)
        except JobRejected as refusal:
            await self.refuse(interaction, str(refusal))
            return None


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(JobsCog(bot))
