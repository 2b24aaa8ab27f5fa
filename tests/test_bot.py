"""The Discord bot end to end: the real discord.py client (`python -m bot`) logged in to a fake Discord,
a real Redis, and a real worker on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bot.deliveries import DeliveryStore
from imagine.client import ImagineClient
from tests.fake_discord import FakeDiscord, FakeRole, FakeUser
from tests.helpers import (
    RedisServer,
    ServiceProcess,
    free_worker,
    occupy_worker,
    photo,
    pixels,
    png_size,
    service_settings,
    wait_for,
    write_adapter,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALICE = FakeUser(id=1001, name="alice")
BOB = FakeUser(id=1002, name="bob")
CAROL = FakeUser(id=1003, name="carol")
ADMIN = FakeUser(id=1009, name="admin")
ADMIN_ROLE = FakeRole(id=5005, name="image-admins")
EPHEMERAL = 64
SMALL = {"steps": 3, "seed": 7}


class BotProcess(ServiceProcess):
    """`python -m bot`, pointed at the fake Discord."""

    label = "bot"

    def __init__(self, settings, fake: FakeDiscord, log_dir, **env: str) -> None:
        defaults = {
            "DISCORD_TOKEN": fake.token,
            "DISCORD_API_BASE": f"{fake.base_url}/api/v10",
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DISCORD_GUILD_IDS": str(fake.guild_id),
            "ADMIN_ROLE_IDS": str(ADMIN_ROLE.id),
            "ADMINS_BY_MANAGE_GUILD": "false",
            "USER_COOLDOWN_S": "0",
            "PROGRESS_EDIT_INTERVAL_S": "0.2",
        }
        super().__init__(settings, "bot", log_dir, {**defaults, **env})
        self.fake = fake
        self.command = [sys.executable, "-m", "bot"]
        self._identified_before = 0

    def start(self, wait: bool = True):
        self._identified_before = self.fake.identify_count
        return super().start(wait)

    def is_ready(self) -> bool:
        return self.fake.connected and self.fake.identify_count > self._identified_before


@pytest.fixture(scope="module")
def discord_env(redis_server, model_cache, tmp_path_factory, adapter_weights):
    """A fake Discord with alice, bob, carol and an admin; a worker; the bot logged in."""
    from tests.helpers import WorkerProcess

    logs = tmp_path_factory.mktemp("bot-logs")
    lora_dir = tmp_path_factory.mktemp("bot-loradir")
    write_adapter(lora_dir / "flickr30k", "peft", adapter_weights["v1"])
    write_adapter(lora_dir / "style", "diffusers", adapter_weights["v2"])
    settings = service_settings(redis_server.url, f"b{uuid.uuid4().hex[:8]}", max_queue_length=4)
    worker = WorkerProcess(
        settings,
        "botworker",
        logs,
        BASE_MODEL="tiny",
        MODEL_CACHE_DIR=str(model_cache),
        LORA_DIR=str(lora_dir),
        DEFAULT_ADAPTER="flickr30k",
        PROGRESS_INTERVAL_S="0.1",
        PREVIEW_INTERVAL_S="0.1",
    ).start()
    fake = FakeDiscord()
    fake.start()
    fake.add_role(ADMIN_ROLE)
    for user in (ALICE, BOB, CAROL):
        fake.add_member(user)
    fake.add_member(ADMIN, role_ids=[ADMIN_ROLE.id])
    styles = logs / "styles.toml"
    styles.write_text('[photo]\ndescription = "A photograph"\nprompt = "a photograph of {prompt}"\n')
    bot = BotProcess(
        settings, fake, logs, MAX_PENDING_PER_USER="2", STYLES_FILE=str(styles), DELIVERY_CLAIM_S="5"
    ).start()
    bot.styles_file = styles
    yield settings, fake, bot, worker
    bot.stop()
    fake.stop()
    worker.stop()


def final_message(fake: FakeDiscord, interaction_id: str) -> dict:
    interaction = fake.interaction(interaction_id)
    return fake.wait_for(
        lambda: interaction.original if interaction.original and interaction.original.get("embeds") else None,
        # A deadline for a hang, not for speed: an upscale renders 1024² (about 20 s on 2 idle cores, over a
        # minute on 2 busy ones).
        timeout=300,
        what="the result to replace the progress message",
    )


def job_of(message: dict) -> str:
    """The job a message shows, from its buttons' ids (`imagine:<action>:<owner>:<job>`)."""
    return message["components"][0]["components"][0]["custom_id"].split(":")[3]


def delivered(settings, job_id: str) -> bool:
    """The job's delivery is confirmed: the service has let its result go."""
    client = ImagineClient(settings)
    return client.job(job_id).state == "done" and client.result(job_id) is None


def ephemeral_reply(fake: FakeDiscord, interaction_id: str) -> str:
    interaction = fake.interaction(interaction_id)

    def reply():
        for callback in interaction.callbacks:
            if callback["type"] == 4 and callback["data"].get("flags", 0) & EPHEMERAL:
                return callback["data"]["content"]
        for followup in interaction.followups:
            if followup.get("flags", 0) & EPHEMERAL:
                return followup["content"]
        return None

    return fake.wait_for(reply, timeout=30, what="an ephemeral reply")


IMAGE_BUTTONS = [("Upscale", ""), ("Vary", " (subtle)"), ("Vary", " (strong)"), ("Variations of", "")]
PROMPT = "a dog on a beach, *not* <@&123456789012345678> @everyone"


def test_imagine_shows_progress_then_the_images_with_their_seeds(discord_env):
    settings, fake, bot, worker = discord_env
    interaction_id = fake.send_slash_command(
        ALICE, "imagine", {"prompt": PROMPT, "count": 2, "aspect": "1:1", **SMALL}
    )
    interaction = fake.interaction(interaction_id)
    fake.wait_for(lambda: interaction.callbacks, what="the answer")
    # Answered at once (Discord waits 3 s) with the place in the queue, for the whole channel to see.
    (answer,) = interaction.callbacks
    assert answer["type"] == 4 and "Queued: position" in answer["data"]["content"]
    assert not answer["data"].get("flags", 0) & EPHEMERAL
    message = final_message(fake, interaction_id)

    progress = [edit.get("content") or "" for edit in interaction.original_edits]
    assert any("step" in text for text in progress), progress
    assert len(message["attachments_bytes"]) == 2
    embed = message["embeds"][0]
    fields = {field["name"]: field["value"] for field in embed["fields"]}
    assert fields["Seeds"] == "`7`, `8`" and fields["Steps"] == "3" and fields["Size"] == "512×512"
    assert fields["Adapter"].startswith("flickr30k (") and fields["Worker"] == f"`{worker.name}`"
    assert embed["description"] == "a dog on a beach, \\*not\\* <@\u200b&123456789012345678> @\u200beveryone"
    assert message["mention_everyone"] is False and message["mention_roles"] == []
    labels = [component["label"] for row in message["components"] for component in row["components"]]
    assert labels == ["Reroll", "Delete"] + [
        f"{action} {i}{how}" for i in (1, 2) for action, how in IMAGE_BUTTONS
    ]  # fmt: skip
    assert [len(row["components"]) for row in message["components"]] == [2, 4, 4]  # a row per image
    # The bot's log follows the job by its id, as the worker's does.
    job_id = job_of(message)

    def job_lines() -> list[str]:
        return [line for line in bot.log_path.read_text().splitlines() if job_id in line]

    # The bot logs the delivery once Discord has the message: a moment after the test sees it there.
    wait_for(lambda: any("delivered" in line for line in job_lines()), 10, "the bot to log the delivery")
    assert any("submitted" in line for line in job_lines())
    assert all(f"job={job_id}" in line for line in job_lines()), job_lines()

    # The bytes are exactly what the service renders for that seed, from any front end.
    client = ImagineClient(settings)
    direct = client.submit({"prompt": PROMPT, "num_inference_steps": 3, "seed": 7, "num_images_per_prompt": 2})
    list(client.events(direct.job_id))
    assert [pixels(png) for png in message["attachments_bytes"]] == [
        pixels(png) for png in client.result(direct.job_id).images
    ]


def test_reroll_and_delete_buttons_and_a_strangers_click(discord_env):
    _, fake, _, _ = discord_env
    first = final_message(fake, fake.send_slash_command(ALICE, "imagine", {"prompt": "a red house", **SMALL}))
    custom_ids = {c["label"]: c["custom_id"] for row in first["components"] for c in row["components"]}

    refused = fake.click_button(BOB, first, custom_ids["Delete"])
    assert f"Only <@{ALICE.id}> or an admin can delete this." in ephemeral_reply(fake, refused)

    reroll = fake.click_button(BOB, first, custom_ids["Reroll"])  # anyone may reroll: it is their own job
    second = final_message(fake, reroll)
    seeds = {f["name"]: f["value"] for f in second["embeds"][0]["fields"]}["Seeds"]
    assert seeds != "`7`" and "a red house" in second["embeds"][0]["description"]

    variation = final_message(fake, fake.click_button(ALICE, first, custom_ids["Variations of 1"]))
    assert {f["name"]: f["value"] for f in variation["embeds"][0]["fields"]}["Seeds"] == "`8`"

    deleted = fake.click_button(ALICE, first, custom_ids["Delete"])
    assert ephemeral_reply(fake, deleted) == "Deleted."
    assert fake.interaction(deleted).user == ALICE
    assert fake.wait_for(lambda: fake.is_deleted(first), what="the message to be deleted")


def test_an_attached_image_then_upscale_and_vary_buttons(discord_env):
    _, fake, _, _ = discord_env
    options = {"prompt": "a dog", "image": ("dog.png", photo(64, 64)), "strength": 0.5, **SMALL}
    submitted = fake.send_slash_command(ALICE, "imagine", options)
    first = final_message(fake, submitted)
    # Answered "thinking" at once while the image is fetched and checked, then the placeholder becomes the job.
    assert [callback["type"] for callback in fake.interaction(submitted).callbacks] == [5]
    fields = {f["name"]: f["value"] for f in first["embeds"][0]["fields"]}
    assert fields["Size"] == "512×512" and "at strength 0.5" in fields["Started from"]  # at about 512² pixels
    custom_ids = {c["label"]: c["custom_id"] for row in first["components"] for c in row["components"]}

    upscaled = final_message(fake, fake.click_button(BOB, first, custom_ids["Upscale 1"]))
    (png,) = upscaled["attachments_bytes"]
    assert png_size(png) == (1024, 1024)  # twice the size
    up_fields = {f["name"]: f["value"] for f in upscaled["embeds"][0]["fields"]}
    assert up_fields["Seeds"] == "`7`" and "at strength 0.3" in up_fields["Started from"]

    varied = final_message(fake, fake.click_button(ALICE, first, custom_ids["Vary 1 (strong)"]))
    vary_fields = {f["name"]: f["value"] for f in varied["embeds"][0]["fields"]}
    assert vary_fields["Seeds"] != "`7`" and vary_fields["Size"] == "512×512"
    assert "at strength 0.7" in vary_fields["Started from"]
    assert pixels(varied["attachments_bytes"][0]) != pixels(first["attachments_bytes"][0])


def test_styles_are_listed_completed_and_applied_and_an_edit_serves_at_once(discord_env):
    _, fake, bot, _ = discord_env
    listed = ephemeral_reply(fake, fake.send_slash_command(ALICE, "styles", {}))
    assert "**photo** — A photograph\n`a photograph of {prompt}`" in listed
    completing = fake.interaction(
        fake.send_autocomplete(ALICE, "imagine", {"prompt": "a dog", "style": "ph"}, focused="style")
    )
    (callback,) = fake.wait_for(lambda: completing.callbacks, what="the autocomplete answer")
    assert [choice["value"] for choice in callback["data"]["choices"]] == ["photo"]

    styled = fake.send_slash_command(ALICE, "imagine", {"prompt": "a dog", "style": "photo", **SMALL})
    message = final_message(fake, styled)
    assert message["embeds"][0]["description"] == "a photograph of a dog"
    assert {f["name"]: f["value"] for f in message["embeds"][0]["fields"]}["Style"] == "photo"

    bot.styles_file.write_text(bot.styles_file.read_text() + '[noir]\nprompt = "{prompt}, film noir"\n')
    os.utime(bot.styles_file, ns=(time.time_ns() + 10**9,) * 2)
    assert "**noir**" in ephemeral_reply(fake, fake.send_slash_command(ALICE, "styles", {}))
    unknown = fake.send_slash_command(ALICE, "imagine", {"prompt": "a dog", "style": "gothic"}, check=False)
    assert "style 'gothic' is not a style of this service; the styles are: photo, noir" in ephemeral_reply(
        fake, unknown
    )


def test_cancel_while_queued_and_a_strangers_cancel(discord_env):
    settings, fake, _, _ = discord_env
    busy = occupy_worker(settings)
    interaction_id = fake.send_slash_command(CAROL, "imagine", {"prompt": "never drawn", **SMALL})
    interaction = fake.interaction(interaction_id)
    queued = fake.wait_for(
        lambda: interaction.original if "Queued" in (interaction.original or {}).get("content", "") else None,
        what="the queued message",
    )
    cancel_id = queued["components"][0]["components"][0]["custom_id"]
    assert "position 1" in queued["content"]
    stranger = fake.click_button(BOB, queued, cancel_id)
    assert "can cancel this" in ephemeral_reply(fake, stranger)
    owner = fake.click_button(CAROL, queued, cancel_id)
    assert ephemeral_reply(fake, owner) == "Cancelled."
    fake.wait_for(lambda: "Cancelled." in interaction.original["content"], what="the message to say cancelled")
    free_worker(settings, busy)


def test_result_after_the_token_expired_is_posted_in_the_channel(discord_env):
    settings, fake, _, _ = discord_env
    busy = occupy_worker(settings)
    interaction_id = fake.send_slash_command(ALICE, "imagine", {"prompt": "late @everyone", **SMALL})
    interaction = fake.interaction(interaction_id)
    fake.wait_for(lambda: "Queued" in (interaction.original or {}).get("content", ""), what="the job to be queued")
    fake.expire_interaction(interaction_id)
    fake.set_bot_may_post(fake.channel_id, False)  # an admin took Send Messages away meanwhile
    try:
        free_worker(settings, busy)
        fake.wait_for(lambda: fake.refused_posts >= 2, timeout=60, what="the bot to try, and try again")
    finally:
        fake.set_bot_may_post(fake.channel_id, True)  # ...and gives it back: the bot delivers, no restart needed
    posted = fake.wait_for(
        lambda: [m for m in fake.channel_messages(fake.channel_id) if m.get("embeds")],
        timeout=60,
        what="the result in the channel",
    )
    (message,) = posted
    assert message["content"].startswith(f"<@{ALICE.id}> your images are ready")
    assert message["allowed_mentions_sent"]["parse"] == [] and message["allowed_mentions_sent"]["users"] == [ALICE.id]
    assert "@\u200beveryone" in message["embeds"][0]["description"]  # escaped: pings no one
    assert len(message["attachments_bytes"]) == 1


def test_bot_restarted_mid_job_delivers_the_result_once(discord_env):
    settings, fake, bot, _ = discord_env
    earlier = final_message(fake, fake.send_slash_command(CAROL, "imagine", {"prompt": "from before", **SMALL}))
    busy = occupy_worker(settings)
    interaction_id = fake.send_slash_command(BOB, "imagine", {"prompt": "survives a restart", **SMALL})
    interaction = fake.interaction(interaction_id)
    fake.wait_for(lambda: "Queued" in (interaction.original or {}).get("content", ""), what="the job to be queued")
    client = ImagineClient(settings, client_name="discord")
    job_id = job_of(interaction.original)
    # Killed once it has noted which message shows the job (killed before that, it posts the result in the
    # channel instead, as the token-expiry test shows): the message is what this test follows.
    deliveries = DeliveryStore(client.records(), ttl_s=60, claim_s=30)
    wait_for(lambda: deliveries.get(job_id).message_id is not None, 10, "the bot to note the job's message")
    bot.kill()
    syncs = fake.sync_calls
    free_worker(settings, busy)
    wait_for(lambda: client.job(job_id).state == "done", 60, "the job to finish while the bot is down")
    assert client.result(job_id) is not None  # kept for the bot
    bot.start()
    message = final_message(fake, interaction_id)
    assert message["embeds"][0]["description"] == "survives a restart"
    fake.wait_for(lambda: delivered(settings, job_id), what="the delivery to be confirmed")
    final_edits = [edit for edit in interaction.original_edits if edit.get("embeds")]
    assert len(final_edits) == 1
    assert fake.sync_calls == syncs  # unchanged commands are not synced again

    # Buttons of a message sent before the restart still work.
    delete = next(c["custom_id"] for row in earlier["components"] for c in row["components"] if c["label"] == "Delete")
    assert ephemeral_reply(fake, fake.click_button(CAROL, earlier, delete)) == "Deleted."


def test_admin_reload_reaches_the_worker_and_others_are_refused(discord_env):
    _, fake, _, worker = discord_env
    refused = fake.send_slash_command(ALICE, "reload-adapter", {"name": "flickr30k"})
    assert "This command is for the bot's admins." in ephemeral_reply(fake, refused)
    allowed = fake.send_slash_command(ADMIN, "reload-adapter", {"name": "flickr30k"})
    table = ephemeral_reply(fake, allowed)
    assert worker.name in table and "flickr30k" in table and " ok" in table
    queue = ephemeral_reply(fake, fake.send_slash_command(ADMIN, "queue", {}))
    assert "workers online:  1" in queue
    adapters = ephemeral_reply(fake, fake.send_slash_command(ADMIN, "adapters", {}))
    assert "flickr30k (default)" in adapters


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": 0}, "num_inference_steps must be an integer from 1 to 100 (got 0)"),
        ({"guidance": 99.0}, "guidance_scale must be a number from 0.0 to 30.0"),
        ({"count": 9}, "num_images_per_prompt must be an integer from 1 to 4 (got 9)"),
        ({"seed": -5}, "seed must be an integer from 0 to 4294967295"),
        ({"aspect": "21:9"}, "aspect must be one of 1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16 (got '21:9')"),
        ({"image": ("notes.txt", b"not a picture")}, "image is not a PNG, JPEG or WebP file"),
        ({"image": ("huge.png", b"x" * (10 * 2**20 + 1))}, "image is 10.0 MiB; at most 10.0 MiB: send a smaller file"),
        ({"image": ("strip.png", photo(1000, 10))}, "image is 1000×10: kept in shape, it would render at 5120×48"),
        ({"image": ("a.png", photo(64, 64)), "strength": 1.5}, "strength must be a number from 0.0 to 1.0"),
        ({"strength": 0.5}, "strength applies to an image to start from"),
        ({"adapter": "../../etc"}, "adapter must be a name of letters"),
        ({"scheduler": "magic"}, "scheduler must be one of"),
        ({"adapter_scale": 5.0}, "adapter_scale must be a number from 0.0 to 2.0"),
        ({"loras": "flickr30k:lots"}, "adapters: the scale after ':' in 'flickr30k:lots' must be a number"),
        ({"loras": "flickr30k, style:0.5, flickr30k:0.2"}, "adapters: flickr30k is listed twice"),
        ({"loras": "flickr30k:3"}, "adapters: the scale of flickr30k must be a number from 0.0 to 2.0"),
        ({"loras": "flickr30k", "adapter": "none"}, "give either adapters"),
    ],
)
def test_each_bad_option_gets_an_ephemeral_message(discord_env, options, message):
    _, fake, _, _ = discord_env
    # Discord's client would refuse most of these; a modified client or an API call would not.
    interaction_id = fake.send_slash_command(ALICE, "imagine", {"prompt": "x", **options}, check=False)
    assert message in ephemeral_reply(fake, interaction_id)
    interaction = fake.interaction(interaction_id)
    (callback,) = interaction.callbacks
    if "image" in options and "huge" not in options["image"][0]:
        # An image is fetched and checked after a public "thinking" answer, which its refusal replaces.
        assert callback["type"] == 5
        fake.wait_for(lambda: interaction.deleted_original, what="the placeholder to be deleted")
    else:
        assert callback["data"]["flags"] & EPHEMERAL  # no deferral: nothing was queued


def test_per_user_limit_and_queue_cap_refuse_politely(discord_env):
    settings, fake, _, _ = discord_env
    busy = occupy_worker(settings)
    first = fake.send_slash_command(ALICE, "imagine", {"prompt": "one", **SMALL})
    second = fake.send_slash_command(ALICE, "imagine", {"prompt": "two", **SMALL})
    for interaction_id in (first, second):
        fake.wait_for(
            lambda i=interaction_id: "Queued" in (fake.interaction(i).original or {}).get("content", ""),
            what="a queued job",
        )
    third = fake.send_slash_command(ALICE, "imagine", {"prompt": "three", **SMALL})
    assert "You already have 2 jobs queued or rendering (the limit is 2)" in ephemeral_reply(fake, third)

    client = ImagineClient(settings)
    filler = [
        client.submit({"prompt": "filler", "num_inference_steps": 2, "width": 64, "height": 64})
        for _ in range(settings.max_queue_length - client.store.queue_length())
    ]
    full = fake.send_slash_command(BOB, "imagine", {"prompt": "no room", **SMALL})
    assert "The queue is full (4 jobs waiting); try again in a few minutes." in ephemeral_reply(fake, full)
    for job in filler:
        client.cancel(job.job_id)
    free_worker(settings, busy)
    for interaction_id in (first, second):
        final_message(fake, interaction_id)


def test_racing_submissions_of_one_user_are_refused_for_that_user_only(discord_env):
    settings, fake, _, _ = discord_env
    busy = occupy_worker(settings)
    # Three at once: no check of the bot's can see the others coming; the service's atomic one does.
    racing = [fake.send_slash_command(BOB, "imagine", {"prompt": f"race {n}", **SMALL}) for n in range(3)]
    answers = [fake.wait_for(lambda i=i: fake.interaction(i).callbacks, what="an answer")[0] for i in racing]
    refused = [answer for answer in answers if answer["data"].get("flags", 0) & EPHEMERAL]
    assert len(refused) == 1 and "You already have 2 jobs queued or rendering" in refused[0]["data"]["content"]
    queued = [i for i, answer in zip(racing, answers, strict=True) if answer not in refused]
    assert len(queued) == 2
    free_worker(settings, busy)
    for interaction_id in queued:
        final_message(fake, interaction_id)
    seen_by_all = [fake.interaction(i).original for i in racing] + fake.channel_messages(fake.channel_id)
    public = [m for m in seen_by_all if m and not m["flags"] & EPHEMERAL]
    assert public and not any("You already have" in (m.get("content") or "") for m in public)


def test_adapter_autocomplete_lists_the_workers_adapters(discord_env):
    _, fake, _, _ = discord_env
    interaction_id = fake.send_autocomplete(ALICE, "imagine", {"prompt": "x", "adapter": "fl"}, focused="adapter")
    interaction = fake.interaction(interaction_id)
    (callback,) = fake.wait_for(lambda: interaction.callbacks, what="the autocomplete answer")
    assert callback["type"] == 8
    assert [choice["value"] for choice in callback["data"]["choices"]] == ["flickr30k"]


def test_loras_blend_several_adapters_completed_as_typed(discord_env):
    settings, fake, _, worker = discord_env
    typed = {"prompt": "x", "loras": "flickr30k:0.6, st"}
    completing = fake.interaction(fake.send_autocomplete(ALICE, "imagine", typed, focused="loras"))
    (callback,) = fake.wait_for(lambda: completing.callbacks, what="the autocomplete answer")
    assert [choice["value"] for choice in callback["data"]["choices"]] == ["flickr30k:0.6, style:1.0"]

    interaction_id = fake.send_slash_command(
        ALICE, "imagine", {"prompt": PROMPT, "loras": "flickr30k:0.6, style:0.3", **SMALL}
    )
    fields = {field["name"]: field["value"] for field in final_message(fake, interaction_id)["embeds"][0]["fields"]}
    loaded = ImagineClient(settings).queue_stats().workers[worker.name].adapters
    versions = {name: loaded[name].version for name in ("flickr30k", "style")}
    assert fields["Adapters"] == f"flickr30k ({versions['flickr30k']}) × 0.6, style ({versions['style']}) × 0.3"


def test_bot_imports_no_torch():
    probe = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import bot.__main__, bot.app, bot.cogs.imagine, bot.cogs.jobs, bot.cogs.admin",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.split("|")[-1].strip().split(".")[0] for line in probe.stderr.splitlines() if "|" in line}
    assert "discord" in imported and "celery" in imported
    assert not imported & {"torch", "diffusers", "transformers", "peft", "accelerate"}


def test_redis_crash_mid_job_users_are_told_and_the_result_still_arrives(model_cache, tmp_path):
    from tests.helpers import WorkerProcess

    server = RedisServer(tmp_path, persistent=True)
    server.start()
    settings = service_settings(server.url, f"o{uuid.uuid4().hex[:8]}")
    worker = WorkerProcess(
        settings, "outage", tmp_path, BASE_MODEL="tiny", MODEL_CACHE_DIR=str(model_cache), DEFAULT_ADAPTER=""
    )
    fake = FakeDiscord()
    fake.start()
    bot = BotProcess(settings, fake, tmp_path)
    try:
        worker.start()
        for user in (ALICE, BOB):
            fake.add_member(user)
        bot.start()
        client = ImagineClient(settings)
        long_job = {"prompt": "through a Redis crash", "aspect": "1:1", "steps": 40, "seed": 3, "adapter": "none"}
        through_crash = fake.send_slash_command(ALICE, "imagine", long_job)
        job_id = wait_for(lambda: client.store.running_jobs(), 60, "the job to start")[0]
        wait_for(lambda: any(e.type == "step" for _, e in client.store.read_events(job_id)), 60, "a step")
        server.crash()

        sent = time.monotonic()
        refused = fake.send_slash_command(BOB, "imagine", {"prompt": "while Redis is down", **SMALL})
        assert "The image service is not answering right now" in ephemeral_reply(fake, refused)
        assert time.monotonic() - sent < 3  # Discord forgets an interaction not answered within 3 s

        wait_for(lambda: "storing the images: Redis is not answering" in worker.log(), 120, "the render to end")
        server.start()
        message = final_message(fake, through_crash)
        assert message["embeds"][0]["description"] == "through a Redis crash"
        assert len(message["attachments_bytes"]) == 1
        again = final_message(fake, fake.send_slash_command(BOB, "imagine", {"prompt": "after the crash", **SMALL}))
        assert again["embeds"][0]["description"] == "after the crash"
    finally:
        bot.stop()
        fake.stop()
        worker.stop()
        server.stop()


def held_final_edit(fake: FakeDiscord):
    """Holds the edit that replaces a job's progress with its images: the bot is then mid-delivery."""
    return fake.hold(lambda method, path, body: method == "PATCH" and bool(body.get("embeds")))


def test_sigterm_finishes_the_delivery_under_way_then_closes_the_gateway(discord_env):
    settings, fake, bot, _ = discord_env
    held = held_final_edit(fake)
    interaction_id = fake.send_slash_command(CAROL, "imagine", {"prompt": "delivered while stopping", **SMALL})
    assert held.arrived.wait(60), "the bot never started delivering"
    closes = len(fake.client_close_codes)
    bot.process.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
    time.sleep(1)
    assert bot.process.poll() is None  # waiting for its delivery to finish
    held.release()
    assert bot.process.wait(60) == 0
    assert final_message(fake, interaction_id)["embeds"][0]["description"] == "delivered while stopping"
    assert fake.client_close_codes[closes:] == [1000]  # the gateway session closed, not dropped
    log = bot.log_path.read_text()
    assert "SIGTERM received: finishing the deliveries under way" in log and " INFO bot: stopped" in log
    assert delivered(settings, job_of(final_message(fake, interaction_id)))
    bot.start()


def test_bot_killed_mid_delivery_delivers_soon_after_restart_and_once(discord_env):
    settings, fake, bot, _ = discord_env
    held = held_final_edit(fake)
    interaction_id = fake.send_slash_command(ALICE, "imagine", {"prompt": "crash while delivering", **SMALL})
    assert held.arrived.wait(60), "the bot never started delivering"
    bot.kill()
    held.release()
    fake.wait_for(lambda: held.abandoned == 1, what="the killed bot's edit to be dropped")
    bot.start()
    # Its claim on the delivery runs out (DELIVERY_CLAIM_S, 5 s here), instead of five minutes.
    message = final_message(fake, interaction_id)
    assert message["embeds"][0]["description"] == "crash while delivering"
    interaction = fake.interaction(interaction_id)
    assert len([edit for edit in interaction.original_edits if edit.get("embeds")]) == 1
    fake.wait_for(lambda: delivered(settings, job_of(message)), what="the delivery to be confirmed")
