"""A fake Discord for tests: REST under /api/v10 and a gateway websocket on 127.0.0.1.

The real, unpatched discord.py client logs in to it; only two class attributes point it here::

    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)

Messages the bot created are recorded as the JSON the fake answered plus three keys of its own:
"attachments_bytes" (the uploaded bytes, in the order of "attachments"), "deleted", and "allowed_mentions_sent"
(the allowed_mentions of the last request that set the message's text; None when it sent none, which on Discord
means that everyone named is pinged). "mentions"/"mention_roles"/"mention_everyone" say who that pinged.

The server runs on its own event loop in a background thread, so synchronous tests can drive it (send slash
commands, click buttons) while the bot runs in another thread or process, and then read what the bot did.
Payload shapes follow what discord.py 2.7 reads; Discord's limits that are cheap to check are enforced so that
a bot that would fail against Discord fails here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web

API_PREFIX = "/api/v10"
DISCORD_EPOCH_MS = 1_420_070_400_000
HEARTBEAT_INTERVAL_MS = 41_250
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024  # an unboosted guild's upload limit

# Permission bits (https://discord.com/developers/docs/topics/permissions).
ADMINISTRATOR = 1 << 3
ALL_PERMISSIONS = (1 << 51) - 1
EVERYONE_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 31)  # view, send, read history, use commands
BOT_PERMISSIONS = EVERYONE_PERMISSIONS | (1 << 14) | (1 << 15) | (1 << 18)  # + embed links, attach files, emojis

# Message flags.
SUPPRESS_EMBEDS = 1 << 2
EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_NOTIFICATIONS = 1 << 12
IS_COMPONENTS_V2 = 1 << 15
CREATE_FLAGS = SUPPRESS_EMBEDS | EPHEMERAL | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2
EDIT_FLAGS = SUPPRESS_EMBEDS | IS_COMPONENTS_V2

# Interaction types, and the callback types Discord accepts for each.
APPLICATION_COMMAND, MESSAGE_COMPONENT, AUTOCOMPLETE = 2, 3, 4
ALLOWED_CALLBACKS = {APPLICATION_COMMAND: {4, 5, 9}, MESSAGE_COMPONENT: {4, 5, 6, 7, 9}, AUTOCOMPLETE: {8}}
MESSAGE_TYPE_DEFAULT, MESSAGE_TYPE_REPLY, MESSAGE_TYPE_CHAT_INPUT = 0, 19, 20

# Application command option types.
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT = 3, 4, 5, 6, 7, 8, 9, 10, 11

logger = logging.getLogger(__name__)

COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
PRIVATE_KEYS = ("attachments_bytes", "deleted", "allowed_mentions_sent")


@dataclass
class FakeUser:
    id: int
    name: str
    bot: bool = False


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int = 0


@dataclass
class FakeInteraction:
    """One interaction sent to the bot, and everything the bot answered to it."""

    id: str
    token: str
    type: int
    user: FakeUser
    channel_id: int
    payload: dict = field(default_factory=dict)  # the INTERACTION_CREATE data the bot received
    callbacks: list[dict] = field(default_factory=list)  # accepted callback bodies (payload_json parsed)
    original: dict | None = None  # the live original response message
    original_edits: list[dict] = field(default_factory=list)  # every PATCH @original body, in order
    followups: list[dict] = field(default_factory=list)  # live messages POSTed to the interaction webhook
    deleted_original: bool = False
    expired: bool = False


@dataclass
class HeldRequests:
    """REST requests the fake keeps waiting, as a slow or stalled Discord would (see `FakeDiscord.hold`)."""

    matches: Callable[[str, str, dict], bool]
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    abandoned: int = 0
    """Held requests whose client went away before the fake answered: the fake never acted on them."""

    def release(self) -> None:
        self.released.set()


@dataclass
class _Member:
    user: FakeUser
    role_ids: list[int]
    permissions: int | None  # None: computed from the roles
    joined_at: str


@dataclass
class _Session:
    """A gateway session: it outlives its socket so that a client can RESUME it and get the missed events."""

    id: str
    shard: list[int] | None
    ws: web.WebSocketResponse | None
    seq: int = 0
    events: list[tuple[int, str]] = field(default_factory=list)
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _ApiError(Exception):
    """An error answer the way Discord words it: {"message", "code"} and, for form errors, "errors"."""

    def __init__(self, status: int, code: int, message: str, errors: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors


def _form_error(path: str, message: str) -> _ApiError:
    """A 50035 Invalid Form Body error for a dotted path ("data.content"), nested like Discord's."""
    errors: dict = {"_errors": [{"code": "BASE_TYPE_INVALID", "message": message}]}
    for key in reversed(path.split(".")):
        errors = {key: errors}
    return _ApiError(400, 50035, "Invalid Form Body", errors)


def _json_response(data: Any, status: int = 200) -> web.Response:
    # Exactly "application/json": discord.py reads anything else (even with "; charset=utf-8") as text.
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _public(message: dict) -> dict:
    """A stored message as Discord would send it (without the fake's bookkeeping keys)."""
    return {key: value for key, value in message.items() if key not in PRIVATE_KEYS}


def _walk_components(components: Iterable[Any]) -> Iterable[dict]:
    """Every component in a tree of action rows, containers, sections and accessories."""
    for component in components:
        if not isinstance(component, dict):
            continue
        yield component
        for value in component.values():
            if isinstance(value, list):
                yield from _walk_components(value)
            elif isinstance(value, dict):
                yield from _walk_components([value])


class FakeDiscord:
    """One guild with an @everyone role, a `general` and an `nsfw` text channel, and the bot as a member.

    All public methods are synchronous and may be called from any thread.
    """

    def __init__(
        self,
        token: str = "test-token",
        app_id: int = 1_200_000_000_000_000_001,
        bot_user_id: int | None = None,
        guild_id: int = 1_200_000_000_000_000_100,
    ) -> None:
        self.token = token
        self.app_id = app_id
        self.bot_user_id = bot_user_id or app_id  # a bot user's id is its application's id
        self.guild_id = guild_id
        self.channel_id = guild_id + 1
        self.nsfw_channel_id = guild_id + 2
        self.bot_role_id = guild_id + 3
        self.owner_id = guild_id + 4  # a guild owner who is no member of interest
        self.bot_user = FakeUser(self.bot_user_id, "Fake Bot", bot=True)

        self.synced_commands: dict[str | int, list[dict]] = {}
        self.sync_calls = 0
        self.identify_count = 0
        self.resume_count = 0
        self.intents = 0  # from the last IDENTIFY
        self.requests: list[tuple[str, str]] = []  # (method, path below /api/v10)
        self.unknown_requests: list[tuple[str, str]] = []
        self.server_errors: list[tuple[str, str, str]] = []  # requests the fake itself failed on (a fake bug)
        self.client_close_codes: list[int | None] = []  # the close code of each gateway socket a client closed
        self._holds: list[HeldRequests] = []

        self._lock = threading.RLock()
        self._last_id = 0
        self._roles: dict[int, FakeRole] = {
            guild_id: FakeRole(guild_id, "@everyone", EVERYONE_PERMISSIONS),
            self.bot_role_id: FakeRole(self.bot_role_id, "Fake Bot", BOT_PERMISSIONS),
        }
        self._channels: dict[int, dict] = {
            self.channel_id: self._channel_json(self.channel_id, "general", nsfw=False, position=0),
            self.nsfw_channel_id: self._channel_json(self.nsfw_channel_id, "nsfw", nsfw=True, position=1),
        }
        self._members: dict[int, _Member] = {
            self.bot_user_id: _Member(self.bot_user, [self.bot_role_id], None, _now()),
        }
        self._messages: dict[int, dict] = {}
        self._channel_posts: dict[int, list[dict]] = {}
        self._channels_without_posting: set[int] = set()
        self.refused_posts = 0
        """Channel messages refused with 403 Missing Permissions."""
        self._attachments: dict[int, bytes] = {}
        self._interactions: dict[str, FakeInteraction] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self._session: _Session | None = None
        self._sockets: set[web.WebSocketResponse] = set()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._routes = self._route_table()

    # Lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on a free port of 127.0.0.1 from a background thread."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-discord", daemon=True)
        self._thread.start()
        self._call(self._serve(sock))

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> FakeDiscord:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("FakeDiscord is not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_base(self) -> str:
        """What discord.http.Route.BASE must be set to."""
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/gateway"

    def env(self) -> dict[str, str]:
        """Environment for a bot subprocess (the names of bot.settings.BotSettings)."""
        return {
            "DISCORD_TOKEN": self.token,
            "DISCORD_API_BASE": self.api_base,
            "DISCORD_GATEWAY_URL": self.gateway_url,
            "DISCORD_GUILD_IDS": str(self.guild_id),
        }

    # Guild setup ----------------------------------------------------------------------------------------------

    def add_role(self, role: FakeRole) -> None:
        with self._lock:
            event = "GUILD_ROLE_UPDATE" if role.id in self._roles else "GUILD_ROLE_CREATE"
            self._roles[role.id] = role
            data = {"guild_id": str(self.guild_id), "role": self._role_json(role)}
        self._dispatch_if_connected(event, data, intent=1 << 0)

    def add_member(self, user: FakeUser, role_ids: Iterable[int] = (), permissions: int | None = None) -> None:
        """Add (or update) a member. `permissions` is what interactions report for them (`interaction.permissions`);
        None computes it from @everyone and their roles, as Discord does."""
        role_ids = [int(role_id) for role_id in role_ids]
        with self._lock:
            unknown = [role_id for role_id in role_ids if role_id not in self._roles]
            if unknown:
                raise ValueError(f"unknown role ids {unknown}: add_role() them first")
            event = "GUILD_MEMBER_UPDATE" if user.id in self._members else "GUILD_MEMBER_ADD"
            self._members[user.id] = member = _Member(user, role_ids, permissions, _now())
            data = {"guild_id": str(self.guild_id), **self._member_json(member)}
        self._dispatch_if_connected(event, data, intent=1 << 1)

    # Gateway state --------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """A client holds a ready gateway session on an open socket right now."""
        session = self._session
        return session is not None and session.ready and session.ws is not None and not session.ws.closed

    def wait_ready(self, timeout: float = 30) -> None:
        """Until a client identified (or resumed) and was sent READY and GUILD_CREATE."""
        self.wait_for(lambda: self.connected, timeout, "a gateway client to be READY")

    def disconnect_clients(self, resumable: bool = True) -> None:
        """Close every gateway socket (code 4000). With resumable=False the session is forgotten, so the client's
        RESUME gets INVALID_SESSION and it identifies again."""
        self._call(self._disconnect(resumable))

    # Interactions ---------------------------------------------------------------------------------------------

    def send_slash_command(
        self,
        user: FakeUser,
        name: str,
        options: dict | None = None,
        channel_id: int | None = None,
        check: bool = True,
    ) -> str:
        """Dispatch a chat input command previously synced; `name` may be "group sub". Returns the interaction id.

        Values are checked against the synced bounds, choices and required options as Discord's client does;
        check=False sends them anyway (what a stale command definition in a user's client lets through)."""
        data = self._command_data(name, options or {}, focused=None, check=check)
        return self._send_interaction(user, APPLICATION_COMMAND, data, channel_id)

    def send_autocomplete(
        self, user: FakeUser, name: str, options: dict, focused: str, channel_id: int | None = None
    ) -> str:
        """Dispatch an autocomplete request; `options[focused]` is what the user typed so far."""
        if focused not in options:
            raise ValueError(f"the focused option {focused!r} needs a value in options")
        data = self._command_data(name, options, focused=focused, check=True)
        return self._send_interaction(user, AUTOCOMPLETE, data, channel_id)

    def click_button(self, user: FakeUser, message: dict, custom_id: str, channel_id: int | None = None) -> str:
        """Click an enabled button of a message the bot sent (its current version is used)."""
        with self._lock:
            current = self._messages.get(int(message["id"]), message)
            if current.get("deleted"):
                raise ValueError(f"message {message['id']} was deleted")
            button = next(
                (c for c in _walk_components(current.get("components", [])) if c.get("custom_id") == custom_id),
                None,
            )
            if button is None or button.get("type") != 2:
                raise ValueError(f"no button {custom_id!r} on message {message['id']}")
            if button.get("disabled"):
                raise ValueError(f"button {custom_id!r} is disabled")
            public = _public(current)
        data = {"custom_id": custom_id, "component_type": 2}
        channel_id = channel_id or int(current["channel_id"])
        return self._send_interaction(user, MESSAGE_COMPONENT, data, channel_id, message=public)

    def expire_interaction(self, interaction_id: str) -> None:
        """Make the interaction's token invalid, as after Discord's 15 minutes."""
        with self._lock:
            self._interactions[str(interaction_id)].expired = True

    def interaction(self, interaction_id: str | int) -> FakeInteraction:
        return self._interactions[str(interaction_id)]

    def set_bot_may_post(self, channel_id: int, allowed: bool) -> None:
        """Take the bot's Send Messages in a channel away, or give it back, as a server admin would."""
        with self._lock:
            (self._channels_without_posting.discard if allowed else self._channels_without_posting.add)(channel_id)

    def hold(self, matches: Callable[[str, str, dict], bool]) -> HeldRequests:
        """Keep REST requests for which `matches(method, path, body)` is true waiting until released. A held
        request whose client has gone by then (a bot killed meanwhile) is dropped: Discord never got it."""
        held = HeldRequests(matches)
        with self._lock:
            self._holds.append(held)
        return held

    # What the bot did -----------------------------------------------------------------------------------------

    def channel_messages(self, channel_id: int, include_deleted: bool = False) -> list[dict]:
        """Messages the bot posted with POST /channels/{id}/messages (live dicts: edits show up)."""
        with self._lock:
            posts = self._channel_posts.get(int(channel_id), [])
            return [message for message in posts if include_deleted or not message["deleted"]]

    def message(self, message_id: str | int) -> dict:
        """Any message the bot created (channel post or interaction response), by id."""
        return self._messages[int(message_id)]

    def is_deleted(self, message: dict | str | int) -> bool:
        """Whether the bot deleted this message (a message dict or its id)."""
        message_id = message["id"] if isinstance(message, dict) else message
        return self._messages[int(message_id)]["deleted"]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, what: str = "") -> Any:
        """Poll `predicate` until it returns something truthy and return that. A LookupError it raises (an
        interaction or message not there yet) counts as falsy."""
        deadline = time.monotonic() + timeout
        last_error: LookupError | None = None
        while True:
            try:
                value = predicate()
            except LookupError as exc:
                value, last_error = None, exc
            if value:
                return value
            if time.monotonic() > deadline:
                detail = f" (last error: {last_error!r})" if last_error else ""
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}{detail}")
            time.sleep(0.02)

    # Payloads -------------------------------------------------------------------------------------------------

    def _new_id(self) -> int:
        """A snowflake: increasing, and dated now so that discord.py's created_at makes sense."""
        with self._lock:
            stamp = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
            self._last_id = max(stamp, self._last_id + 1)
            return self._last_id

    def _user_json(self, user: FakeUser) -> dict:
        return {
            "id": str(user.id),
            "username": user.name,
            "global_name": None if user.bot else user.name,
            "discriminator": "0",
            "avatar": None,
            "bot": user.bot,
            "system": False,
            "public_flags": 0,
        }

    def _role_json(self, role: FakeRole) -> dict:
        data = {
            "id": str(role.id),
            "name": role.name,
            "permissions": str(role.permissions),
            "position": 0 if role.id == self.guild_id else 1,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": role.id == self.bot_role_id,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }
        if role.id == self.bot_role_id:
            data["tags"] = {"bot_id": str(self.bot_user_id)}
        return data

    def _channel_json(self, channel_id: int, name: str, nsfw: bool, position: int) -> dict:
        return {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": name,
            "position": position,
            "permission_overwrites": [],
            "nsfw": nsfw,
            "topic": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "last_message_id": None,
            "flags": 0,
        }

    def _permissions(self, member: _Member) -> int:
        if member.permissions is not None:
            return member.permissions
        value = self._roles[self.guild_id].permissions
        for role_id in member.role_ids:
            value |= self._roles[role_id].permissions
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def _member_json(self, member: _Member, with_permissions: bool = False) -> dict:
        data = {
            "user": self._user_json(member.user),
            "roles": [str(role_id) for role_id in member.role_ids],
            "joined_at": member.joined_at,
            "nick": None,
            "avatar": None,
            "premium_since": None,
            "communication_disabled_until": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
        }
        if with_permissions:
            data["permissions"] = str(self._permissions(member))
        return data

    def _guild_json(self) -> dict:
        with self._lock:
            return {
                "id": str(self.guild_id),
                "name": "Fake Guild",
                "icon": None,
                "owner_id": str(self.owner_id),
                "unavailable": False,
                "large": False,
                "member_count": len(self._members),
                "joined_at": self._members[self.bot_user_id].joined_at,
                "roles": [self._role_json(role) for role in self._roles.values()],
                "channels": [dict(channel) for channel in self._channels.values()],
                "members": [self._member_json(member) for member in self._members.values()],
                "voice_states": [],
                "presences": [],
                "threads": [],
                "stage_instances": [],
                "guild_scheduled_events": [],
                "soundboard_sounds": [],
                "emojis": [],
                "stickers": [],
                "features": [],
                "verification_level": 0,
                "default_message_notifications": 0,
                "explicit_content_filter": 0,
                "mfa_level": 0,
                "nsfw_level": 0,
                "premium_tier": 0,
                "premium_subscription_count": 0,
                "preferred_locale": "en-US",
                "system_channel_id": str(self.channel_id),
                "system_channel_flags": 0,
                "afk_channel_id": None,
                "afk_timeout": 300,
            }

    def _application_json(self) -> dict:
        return {
            "id": str(self.app_id),
            "name": self.bot_user.name,
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self._user_json(FakeUser(self.owner_id, "owner")),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
        }

    # Commands -------------------------------------------------------------------------------------------------

    def _find_command(self, name: str) -> tuple[str | int, dict]:
        """The synced chat input command `name`, guild commands first (as Discord's client lists them)."""
        with self._lock:
            for scope in (self.guild_id, "global"):
                for command in self.synced_commands.get(scope, []):
                    if command["name"] == name and command.get("type", 1) == 1:
                        return scope, command
        raise ValueError(f"no synced command /{name}; synced: {self.synced_commands}")

    def _command_data(self, name: str, options: dict, focused: str | None, check: bool) -> dict:
        """The `data` of an APPLICATION_COMMAND or AUTOCOMPLETE interaction, options typed per the synced command."""
        root, *path = name.split()
        scope, command = self._find_command(root)
        definitions = command.get("options", [])
        parents = []
        for part in path:
            parent = next(
                (o for o in definitions if o["name"] == part and o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP)), None
            )
            if parent is None:
                raise ValueError(f"/{root} has no subcommand {part!r}")
            parents.append(parent)
            definitions = parent.get("options", [])
        if any(o["type"] in (SUB_COMMAND, SUB_COMMAND_GROUP) for o in definitions):
            raise ValueError(f"/{name} is a group: name one of its subcommands")

        resolved: dict[str, dict] = {}
        values = []
        by_name = {o["name"]: o for o in definitions}
        for option_name, value in options.items():
            definition = by_name.get(option_name)
            if definition is None:
                raise ValueError(f"/{name} has no option {option_name!r}; it has {list(by_name)}")
            option = self._option_value(definition, value, option_name == focused, resolved)
            if check and option_name != focused:
                self._check_option(definition, option["value"])
            values.append(option)
        missing = [o["name"] for o in definitions if o.get("required") and o["name"] not in options]
        if missing and focused is None and check:
            raise ValueError(f"/{name} needs the options {missing}")

        for parent in reversed(parents):
            values = [{"type": parent["type"], "name": parent["name"], "options": values}]
        data = {"id": command["id"], "name": root, "type": 1, "options": values, "resolved": resolved}
        if scope != "global":
            data["guild_id"] = str(scope)
        return data

    def _option_value(self, definition: dict, value: Any, focused: bool, resolved: dict[str, dict]) -> dict:
        """One option as Discord's client sends it, typed per the definition."""
        kind, name = definition["type"], definition["name"]
        option: dict[str, Any] = {"type": kind, "name": name}
        if focused:
            # The client sends what was typed so far, unchecked.
            return {**option, "value": str(value), "focused": True}
        if kind == STRING:
            value = str(value)
        elif kind in (INTEGER, NUMBER):
            value = int(value) if kind == INTEGER else float(value)
        elif kind == BOOLEAN:
            value = bool(value)
        elif kind in (USER, ROLE, MENTIONABLE, CHANNEL, ATTACHMENT):
            value = self._resolve(kind, name, value, resolved)
        return {**option, "value": value}

    @staticmethod
    def _check_option(definition: dict, value: Any) -> None:
        """What Discord's client refuses to send: values outside the bounds or the choices."""
        name = definition["name"]
        if definition["type"] == STRING:
            if not definition.get("min_length", 0) <= len(value) <= definition.get("max_length", 6000):
                raise ValueError(f"option {name!r}: length out of the command's bounds")
        elif definition["type"] in (INTEGER, NUMBER):
            low, high = definition.get("min_value"), definition.get("max_value")
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"option {name!r}: {value} is outside [{low}, {high}]")
        choices = definition.get("choices")
        if choices and value not in [choice["value"] for choice in choices]:
            raise ValueError(f"option {name!r}: {value!r} is not one of the choices {choices}")

    def _resolve(self, kind: int, name: str, value: Any, resolved: dict[str, dict]) -> str:
        """Fill `resolved` for a snowflake option and return the snowflake. Users are FakeUser, roles FakeRole,
        channels ids, attachments (filename, bytes)."""
        with self._lock:
            if isinstance(value, FakeUser) and kind in (USER, MENTIONABLE):
                resolved.setdefault("users", {})[str(value.id)] = self._user_json(value)
                member = self._members.get(value.id)
                if member is not None:
                    data = self._member_json(member, with_permissions=True)
                    del data["user"]
                    resolved.setdefault("members", {})[str(value.id)] = data
                return str(value.id)
            if isinstance(value, FakeRole) and kind in (ROLE, MENTIONABLE):
                resolved.setdefault("roles", {})[str(value.id)] = self._role_json(self._roles.get(value.id, value))
                return str(value.id)
            if kind == CHANNEL and isinstance(value, int) and value in self._channels:
                channel = {**self._channels[int(value)], "permissions": str(ALL_PERMISSIONS)}
                resolved.setdefault("channels", {})[str(value)] = channel
                return str(value)
            if kind == ATTACHMENT and isinstance(value, tuple):
                filename, data = value
                attachment = self._attachment_json(self.channel_id, filename, data)
                resolved.setdefault("attachments", {})[attachment["id"]] = attachment
                return attachment["id"]
        raise ValueError(f"option {name!r} of type {kind}: cannot resolve {value!r}")

    def _send_interaction(
        self, user: FakeUser, kind: int, data: dict, channel_id: int | None, message: dict | None = None
    ) -> str:
        channel_id = int(channel_id or self.channel_id)
        with self._lock:
            member = self._members.get(user.id)
            if member is None:
                raise ValueError(f"{user} is no member of the guild: add_member() them first")
            if channel_id not in self._channels:
                raise ValueError(f"unknown channel {channel_id}")
            interaction_id = str(self._new_id())
            token = f"fake-{secrets.token_urlsafe(32)}"
            payload = {
                "id": interaction_id,
                "application_id": str(self.app_id),
                "type": kind,
                "token": token,
                "version": 1,
                "data": data,
                "guild_id": str(self.guild_id),
                "guild": {"id": str(self.guild_id), "locale": "en-US", "features": []},
                "channel_id": str(channel_id),
                "channel": {**self._channels[channel_id], "permissions": str(self._permissions(member))},
                "member": self._member_json(member, with_permissions=True),
                "locale": "en-US",
                "guild_locale": "en-US",
                "app_permissions": str(self._permissions(self._members[self.bot_user_id])),
                "entitlements": [],
                "authorizing_integration_owners": {"0": str(self.guild_id)},
                "context": 0,
                "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
            }
            if message is not None:
                payload["message"] = message
            interaction = FakeInteraction(interaction_id, token, kind, user, channel_id, payload=payload)
            self._interactions[interaction_id] = interaction
            self._by_token[token] = interaction
        self._call(self._dispatch(self._session, "INTERACTION_CREATE", payload))
        return interaction_id

    # Messages -------------------------------------------------------------------------------------------------

    def _attachment_json(self, channel_id: int, filename: str, data: bytes) -> dict:
        attachment_id = self._new_id()
        self._attachments[attachment_id] = data
        url = f"{self.base_url}/attachments/{channel_id}/{attachment_id}/{filename}"
        return {
            "id": str(attachment_id),
            "filename": filename,
            "size": len(data),
            "url": url,
            "proxy_url": url,
            "content_type": mimetypes.guess_type(filename)[0] or "application/octet-stream",
        }

    def _message_fields(self, body: dict, files: dict[int, tuple[str, bytes]], current: dict) -> dict:
        """The fields a create/edit body sets on `current`, checked against Discord's limits first."""
        fields: dict[str, Any] = {}
        if "content" in body:
            fields["content"] = body["content"] or ""
            if len(fields["content"]) > 2000:
                raise _form_error("content", "Must be 2000 or fewer in length.")
        if "embeds" in body:
            fields["embeds"] = [{"type": "rich", **embed} for embed in body["embeds"] or []]
            self._check_embeds(fields["embeds"])
        if "components" in body:
            fields["components"] = body["components"] or []
            self._check_components(fields["components"])
        if "attachments" in body or files:
            fields["attachments"], fields["attachments_bytes"] = self._attachments_for(body, files, current)

        merged = {**current, **fields}
        if not (merged["flags"] & LOADING) and not (
            merged["content"] or merged["embeds"] or merged["attachments"] or merged["components"]
        ):
            raise _ApiError(400, 50006, "Cannot send an empty message")
        if "content" in body or "allowed_mentions" in body:
            # Who is pinged follows the request that sets the text; editing only buttons pings no one anew.
            fields["allowed_mentions_sent"] = body.get("allowed_mentions")
            fields["mentions"], fields["mention_roles"], fields["mention_everyone"] = self._mentions(
                merged["content"], fields["allowed_mentions_sent"]
            )
        return fields

    def _attachments_for(
        self, body: dict, files: dict[int, tuple[str, bytes]], current: dict
    ) -> tuple[list[dict], list[bytes]]:
        """Discord's rule: `attachments` lists what the message keeps ({"id": existing}) and what it gains
        ({"id": n} for the upload files[n]); without it, uploads are added to what is there."""
        pairs = zip(current["attachments"], current["attachments_bytes"], strict=True)
        kept = {attachment["id"]: (attachment, data) for attachment, data in pairs}
        if "attachments" in body:
            specs = body["attachments"] or []
        else:
            specs = [{"id": a["id"]} for a in current["attachments"]] + [{"id": n} for n in sorted(files)]
        if len(specs) > 10:
            raise _form_error("attachments", "Must be 10 or fewer in length.")
        attachments, blobs = [], []
        for index, spec in enumerate(specs):
            key = str(spec.get("id"))
            if key in kept:
                attachment, data = kept[key]
            elif key.isdigit() and int(key) in files:
                filename, data = files[int(key)]
                if len(data) > ATTACHMENT_SIZE_LIMIT:
                    raise _ApiError(413, 40005, "Request entity too large")
                attachment = self._attachment_json(int(current["channel_id"]), spec.get("filename") or filename, data)
                if spec.get("description"):
                    attachment["description"] = spec["description"]
            else:
                raise _form_error(f"attachments.{index}.id", f"Unknown attachment {key}")
            attachments.append(attachment)
            blobs.append(data)
        return attachments, blobs

    @staticmethod
    def _check_embeds(embeds: list[dict]) -> None:
        if len(embeds) > 10:
            raise _form_error("embeds", "Must be 10 or fewer in length.")
        for index, embed in enumerate(embeds):
            for key, limit in (("title", 256), ("description", 4096)):
                if len(embed.get(key) or "") > limit:
                    raise _form_error(f"embeds.{index}.{key}", f"Must be {limit} or fewer in length.")
            if len(embed.get("fields", [])) > 25:
                raise _form_error(f"embeds.{index}.fields", "Must be 25 or fewer in length.")

    @staticmethod
    def _check_components(components: list[dict]) -> None:
        seen = set()
        for component in _walk_components(components):
            custom_id = component.get("custom_id")
            if custom_id is not None:
                if not 1 <= len(custom_id) <= 100:
                    raise _form_error("components", f"custom_id {custom_id!r}: must be 1 to 100 long.")
                if custom_id in seen:
                    raise _form_error("components", f"Component custom id cannot be duplicated: {custom_id!r}")
                seen.add(custom_id)
            if len(component.get("label") or "") > 80:
                raise _form_error("components", "A label must be 80 or fewer in length.")
            if component.get("type") == 1 and len(component.get("components", [])) > 5:
                raise _form_error("components", "An action row holds 5 or fewer components.")

    def _mentions(self, content: str, allowed: dict | None) -> tuple[list[dict], list[str], bool]:
        """Who the content pings under allowed_mentions (absent: everyone it names, Discord's default)."""
        parse = {"users", "roles", "everyone"} if allowed is None else set(allowed.get("parse") or [])
        # discord.py sends these ids as ints, Discord's docs as strings.
        allowed_users = {str(user_id) for user_id in (allowed or {}).get("users") or []}
        allowed_roles = {str(role_id) for role_id in (allowed or {}).get("roles") or []}
        users = []
        for user_id in dict.fromkeys(re.findall(r"<@!?(\d+)>", content)):
            member = self._members.get(int(user_id))
            if member is not None and ("users" in parse or user_id in allowed_users):
                users.append(self._user_json(member.user))
        roles = [
            role_id
            for role_id in dict.fromkeys(re.findall(r"<@&(\d+)>", content))
            if "roles" in parse or role_id in allowed_roles
        ]
        everyone = "everyone" in parse and ("@everyone" in content or "@here" in content)
        return users, roles, everyone

    def _create_message(
        self,
        channel_id: int,
        body: dict,
        files: dict[int, tuple[str, bytes]],
        *,
        message_type: int = MESSAGE_TYPE_DEFAULT,
        flags: int = 0,
        interaction: FakeInteraction | None = None,
    ) -> dict:
        message = {
            "id": str(self._new_id()),
            "channel_id": str(channel_id),
            "guild_id": str(self.guild_id),
            "author": self._user_json(self.bot_user),
            "content": "",
            "embeds": [],
            "attachments": [],
            "components": [],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": bool(body.get("tts")),
            "type": message_type,
            "timestamp": _now(),
            "edited_timestamp": None,
            "flags": flags,
            "attachments_bytes": [],
            "deleted": False,
            "allowed_mentions_sent": None,
        }
        if interaction is not None:
            message["webhook_id"] = message["application_id"] = str(self.app_id)
            message["interaction_metadata"] = {
                "id": interaction.id,
                "type": interaction.type,
                "user": self._user_json(interaction.user),
                "authorizing_integration_owners": {"0": str(self.guild_id)},
            }
            if interaction.type == MESSAGE_COMPONENT:
                message["interaction_metadata"]["interacted_message_id"] = interaction.payload["message"]["id"]
        message.update(self._message_fields(body, files, message))
        self._messages[int(message["id"])] = message
        return message

    def _edit_message(self, message: dict, body: dict, files: dict[int, tuple[str, bytes]]) -> None:
        fields = self._message_fields(body, files, message)
        flags = message["flags"]
        if "flags" in body:
            flags = (flags & ~EDIT_FLAGS) | ((body["flags"] or 0) & EDIT_FLAGS)
        if flags & LOADING:
            flags &= ~LOADING  # the deferred "thinking" message gets its content: not an edit to users
        else:
            fields["edited_timestamp"] = _now()
        message.update(fields, flags=flags)

    # Server ---------------------------------------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        """Run a coroutine on the fake's loop and wait for it."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("FakeDiscord is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=4 * ATTACHMENT_SIZE_LIMIT)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._attachment)
        app.router.add_route("*", API_PREFIX + "/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _shutdown(self) -> None:
        for ws in list(self._sockets):
            ws.closed_by_fake = True
            await ws.close(code=1001, message=b"fake discord stopping")
        await self._runner.cleanup()

    async def _attachment(self, request: web.Request) -> web.Response:
        attachment_id = request.match_info["attachment_id"]
        data = self._attachments.get(int(attachment_id)) if attachment_id.isdigit() else None
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _route_table(self) -> list[tuple[str, re.Pattern, Callable, bool]]:
        """(method, path pattern, handler, needs the bot token). Webhook routes are authorised by their token."""
        app = r"(?P<app_id>\d+)"
        hook = rf"/webhooks/{app}/(?P<token>[^/]+)"
        table = [
            ("GET", r"/users/@me", self._get_me, True),
            ("GET", r"/oauth2/applications/@me", self._get_application, True),
            ("PUT", rf"/applications/{app}/commands", self._put_commands, True),
            ("GET", rf"/applications/{app}/commands", self._get_commands, True),
            ("PUT", rf"/applications/{app}/guilds/(?P<guild_id>\d+)/commands", self._put_commands, True),
            ("GET", rf"/applications/{app}/guilds/(?P<guild_id>\d+)/commands", self._get_commands, True),
            ("POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback", self._callback, False),
            ("POST", hook, self._post_followup, False),
            ("GET", hook + r"/messages/(?P<message_id>@original|\d+)", self._get_webhook_message, False),
            ("PATCH", hook + r"/messages/(?P<message_id>@original|\d+)", self._patch_webhook_message, False),
            ("DELETE", hook + r"/messages/(?P<message_id>@original|\d+)", self._delete_webhook_message, False),
            ("POST", r"/channels/(?P<channel_id>\d+)/messages", self._post_channel_message, True),
            ("GET", r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)", self._get_channel_message, True),
            (
                "PATCH",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
                self._patch_channel_message,
                True,
            ),
            (
                "DELETE",
                r"/channels/(?P<channel_id>\d+)/messages/(?P<message_id>\d+)",
                self._delete_channel_message,
                True,
            ),
            ("GET", r"/channels/(?P<channel_id>\d+)", self._get_channel, True),
            ("GET", r"/guilds/(?P<guild_id>\d+)/members/(?P<user_id>\d+)", self._get_member, True),
        ]
        return [(method, re.compile(pattern + "$"), handler, bot_auth) for method, pattern, handler, bot_auth in table]

    async def _held(self, request: web.Request, path: str) -> bool:
        """Wait while a hold matches the request; True when its client went away meanwhile."""
        with self._lock:
            holds = [held for held in self._holds if not held.released.is_set()]
        if not holds:
            return False
        body, _ = await self._read_body(request)
        for held in holds:
            if held.matches(request.method, path, body):
                held.arrived.set()
                while not held.released.is_set():
                    await asyncio.sleep(0.05)
                if request.transport is None or request.transport.is_closing():
                    held.abandoned += 1
                    return True
        return False

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        self.requests.append((request.method, path))
        if await self._held(request, path):
            return web.Response(status=499)
        for method, pattern, handler, bot_auth in self._routes:
            match = pattern.match(path)
            if match is None or method != request.method:
                continue
            authorization = request.headers.get("Authorization")
            if (bot_auth or authorization is not None) and authorization != f"Bot {self.token}":
                return _json_response({"message": "401: Unauthorized", "code": 0}, 401)
            try:
                result = await handler(request, **match.groupdict())
            except _ApiError as exc:
                error = {"message": exc.message, "code": exc.code}
                if exc.errors:
                    error["errors"] = exc.errors
                return _json_response(error, exc.status)
            except Exception as exc:
                # Not a 500: discord.py retries those for half a minute. A 400 fails the bot's call at once.
                logger.exception("fake discord could not handle %s %s", request.method, path)
                self.server_errors.append((request.method, path, repr(exc)))
                return _json_response({"message": f"fake discord error: {exc!r}", "code": 50035}, 400)
            return web.Response(status=204) if result is None else _json_response(result)
        self.unknown_requests.append((request.method, path))
        return _json_response({"message": "Unknown route (fake)", "code": 0}, 404)

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, dict[int, tuple[str, bytes]]]:
        """The JSON body, or a multipart body's payload_json and its files[n] uploads (read once, then kept)."""
        if "fake_body" not in request:
            request["fake_body"] = await FakeDiscord._parse_body(request)
        return request["fake_body"]

    @staticmethod
    async def _parse_body(request: web.Request) -> tuple[Any, dict[int, tuple[str, bytes]]]:
        if request.content_type.startswith("multipart/"):
            payload, files = None, {}
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if part.name == "payload_json":
                    payload = json.loads(await part.text())
                elif match := re.fullmatch(r"files\[(\d+)\]", part.name or ""):
                    files[int(match[1])] = (part.filename or f"file{match[1]}", bytes(await part.read()))
            return payload if payload is not None else {}, files
        raw = await request.read()
        return (json.loads(raw) if raw else {}), {}

    # REST handlers --------------------------------------------------------------------------------------------

    async def _get_me(self, request: web.Request) -> dict:
        return {**self._user_json(self.bot_user), "verified": True, "mfa_enabled": False, "flags": 0}

    async def _get_application(self, request: web.Request) -> dict:
        return self._application_json()

    def _command_scope(self, app_id: str, guild_id: str | None) -> str | int:
        if int(app_id) != self.app_id or (guild_id is not None and int(guild_id) != self.guild_id):
            raise _ApiError(403, 50001, "Missing Access")
        return "global" if guild_id is None else int(guild_id)

    async def _get_commands(self, request: web.Request, app_id: str, guild_id: str | None = None) -> list[dict]:
        return self.synced_commands.get(self._command_scope(app_id, guild_id), [])

    async def _put_commands(self, request: web.Request, app_id: str, guild_id: str | None = None) -> list[dict]:
        """Bulk overwrite: a command keeps its id when its name and type stay, as on Discord."""
        scope = self._command_scope(app_id, guild_id)
        commands, _ = await self._read_body(request)
        self._check_commands(commands)
        with self._lock:
            ids = {(c["name"], c.get("type", 1)): c["id"] for c in self.synced_commands.get(scope, [])}
            synced = []
            for command in commands:
                saved = {
                    "type": 1,
                    "options": [],
                    "default_member_permissions": None,
                    "dm_permission": True,
                    "nsfw": False,
                    **command,
                    "id": ids.get((command["name"], command.get("type", 1))) or str(self._new_id()),
                    "application_id": str(self.app_id),
                    "version": str(self._new_id()),
                }
                if scope != "global":
                    saved["guild_id"] = str(scope)
                synced.append(saved)
            self.synced_commands[scope] = synced
            self.sync_calls += 1
        return synced

    @staticmethod
    def _check_commands(commands: Any) -> None:
        if not isinstance(commands, list) or len(commands) > 100:
            raise _form_error("_", "A list of at most 100 commands is expected.")
        seen = set()
        for index, command in enumerate(commands):
            key = (command.get("name"), command.get("type", 1))
            if key in seen:
                raise _form_error(f"{index}.name", "Application command names must be unique")
            seen.add(key)
            if command.get("type", 1) == 1:
                FakeDiscord._check_command_options(str(index), [command], top_level=True)

    @staticmethod
    def _check_command_options(path: str, options: list[dict], top_level: bool = False) -> None:
        """Discord's rules for chat input names, descriptions, option counts, choices and required order."""
        if len(options) > 25:
            raise _form_error(path, "Must be 25 or fewer in length.")
        optional_seen = False
        for index, option in enumerate(options):
            where = path if top_level else f"{path}.options.{index}"
            name = option.get("name", "")
            if not COMMAND_NAME.match(name) or name != name.lower():
                raise _form_error(f"{where}.name", f"Invalid name {name!r}: 1-32 lowercase letters, digits, - or _.")
            if not 1 <= len(option.get("description", "")) <= 100:
                raise _form_error(f"{where}.description", "Must be between 1 and 100 in length.")
            choices = option.get("choices") or []
            if len(choices) > 25:
                raise _form_error(f"{where}.choices", "Must be 25 or fewer in length.")
            if choices and option.get("autocomplete"):
                raise _form_error(f"{where}.autocomplete", "Autocomplete cannot be set with choices.")
            if option.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP) or top_level:
                FakeDiscord._check_command_options(where, option.get("options", []))
            elif option.get("required"):
                if optional_seen:
                    raise _form_error(f"{where}.required", "Required options must be placed before optional ones.")
            else:
                optional_seen = True

    async def _callback(self, request: web.Request, interaction_id: str, token: str) -> dict:
        body, files = await self._read_body(request)
        with self._lock:
            interaction = self._interactions.get(interaction_id)
            if interaction is None or interaction.token != token or interaction.expired:
                raise _ApiError(404, 10062, "Unknown interaction")
            if interaction.callbacks:
                raise _ApiError(400, 40060, "Interaction has already been acknowledged.")
            kind, data = body.get("type"), body.get("data") or {}
            if kind not in ALLOWED_CALLBACKS[interaction.type]:
                raise _form_error("type", f"Callback type {kind} is not valid for interaction type {interaction.type}")
            message = None
            if kind in (4, 5):
                message_type = (
                    MESSAGE_TYPE_CHAT_INPUT if interaction.type == APPLICATION_COMMAND else MESSAGE_TYPE_REPLY
                )
                flags = (data.get("flags") or 0) & CREATE_FLAGS | (LOADING if kind == 5 else 0)
                message = self._create_message(
                    interaction.channel_id,
                    data if kind == 4 else {},
                    files,
                    message_type=message_type,
                    flags=flags,
                    interaction=interaction,
                )
                interaction.original = message
            elif kind in (6, 7):
                # A component interaction's response is the message the component is on.
                clicked = self._messages.get(int(interaction.payload["message"]["id"]))
                if clicked is None or clicked["deleted"]:
                    raise _ApiError(404, 10008, "Unknown Message")
                if kind == 7:
                    self._edit_message(clicked, data, files)
                    message = clicked
                interaction.original = clicked
            elif kind == 8:
                choices = data.get("choices") or []
                if len(choices) > 25:
                    raise _form_error("data.choices", "Must be 25 or fewer in length.")
                for index, choice in enumerate(choices):
                    if not 1 <= len(str(choice.get("name", ""))) <= 100:
                        raise _form_error(f"data.choices.{index}.name", "Must be between 1 and 100 in length.")
            interaction.callbacks.append(body)
            response = {
                "interaction": {
                    "id": interaction.id,
                    "type": interaction.type,
                    "activity_instance_id": None,
                    "response_message_id": interaction.original["id"] if interaction.original else None,
                    "response_message_loading": kind == 5,
                    "response_message_ephemeral": bool(message and message["flags"] & EPHEMERAL),
                },
                "resource": {"type": kind},
            }
            if message is not None:
                response["resource"]["message"] = _public(message)
            return response

    def _webhook_interaction(self, app_id: str, token: str) -> FakeInteraction:
        if int(app_id) != self.app_id:
            raise _ApiError(404, 10015, "Unknown Webhook")
        interaction = self._by_token.get(token)
        if interaction is None or interaction.expired:
            raise _ApiError(401, 50027, "Invalid Webhook Token")
        if not interaction.callbacks:
            raise _ApiError(404, 10015, "Unknown Webhook")  # no response to follow up on or edit yet
        return interaction

    def _webhook_message(self, interaction: FakeInteraction, message_id: str) -> dict:
        if message_id == "@original":
            message = interaction.original
        else:
            own = [interaction.original, *interaction.followups]
            message = next((m for m in own if m is not None and m["id"] == message_id), None)
        if message is None or message["deleted"]:
            raise _ApiError(404, 10008, "Unknown Message")
        return message

    async def _post_followup(self, request: web.Request, app_id: str, token: str) -> dict | None:
        body, files = await self._read_body(request)
        with self._lock:
            interaction = self._webhook_interaction(app_id, token)
            original = interaction.original
            if original is not None and original["flags"] & LOADING and not original["deleted"]:
                # Discord turns the first followup after a "thinking" defer into the deferred message itself.
                self._edit_message(original, body, files)
                message = original
            else:
                message_type = (
                    MESSAGE_TYPE_CHAT_INPUT if interaction.type == APPLICATION_COMMAND else MESSAGE_TYPE_DEFAULT
                )
                flags = (body.get("flags") or 0) & CREATE_FLAGS
                message = self._create_message(
                    interaction.channel_id,
                    body,
                    files,
                    message_type=message_type,
                    flags=flags,
                    interaction=interaction,
                )
            interaction.followups.append(message)
            public = _public(message)
        return public if request.query.get("wait", "").lower() in ("1", "true") else None

    async def _get_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> dict:
        with self._lock:
            return _public(self._webhook_message(self._webhook_interaction(app_id, token), message_id))

    async def _patch_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> dict:
        body, files = await self._read_body(request)
        with self._lock:
            interaction = self._webhook_interaction(app_id, token)
            message = self._webhook_message(interaction, message_id)
            self._edit_message(message, body, files)
            if message is interaction.original:
                interaction.original_edits.append(body)
            return _public(message)

    async def _delete_webhook_message(self, request: web.Request, app_id: str, token: str, message_id: str) -> None:
        with self._lock:
            interaction = self._webhook_interaction(app_id, token)
            message = self._webhook_message(interaction, message_id)
            message["deleted"] = True
            if message is interaction.original:
                interaction.deleted_original = True

    def _channel(self, channel_id: str) -> dict:
        channel = self._channels.get(int(channel_id))
        if channel is None:
            raise _ApiError(404, 10003, "Unknown Channel")
        return channel

    def _channel_message(self, channel_id: str, message_id: str) -> dict:
        self._channel(channel_id)
        message = self._messages.get(int(message_id))
        if (
            message is None
            or message["deleted"]
            or message["channel_id"] != channel_id
            or message["flags"] & EPHEMERAL
        ):
            raise _ApiError(404, 10008, "Unknown Message")
        return message

    async def _post_channel_message(self, request: web.Request, channel_id: str) -> dict:
        body, files = await self._read_body(request)
        with self._lock:
            self._channel(channel_id)
            if int(channel_id) in self._channels_without_posting:
                self.refused_posts += 1
                raise _ApiError(403, 50013, "Missing Permissions")
            reference = body.get("message_reference")
            referenced = None
            if reference:
                try:
                    referenced = self._channel_message(
                        str(reference.get("channel_id") or channel_id), reference["message_id"]
                    )
                except _ApiError:
                    if reference.get("fail_if_not_exists", True):
                        raise
            message = self._create_message(
                int(channel_id),
                body,
                files,
                message_type=MESSAGE_TYPE_REPLY if referenced else MESSAGE_TYPE_DEFAULT,
                flags=(body.get("flags") or 0) & CREATE_FLAGS & ~EPHEMERAL,
            )
            if referenced is not None:
                message["message_reference"] = {
                    "type": 0,
                    "message_id": referenced["id"],
                    "channel_id": referenced["channel_id"],
                    "guild_id": str(self.guild_id),
                }
                message["referenced_message"] = _public(referenced)
            if "nonce" in body:
                message["nonce"] = body["nonce"]
            self._channel_posts.setdefault(int(channel_id), []).append(message)
            return _public(message)

    async def _get_channel_message(self, request: web.Request, channel_id: str, message_id: str) -> dict:
        with self._lock:
            return _public(self._channel_message(channel_id, message_id))

    async def _patch_channel_message(self, request: web.Request, channel_id: str, message_id: str) -> dict:
        body, files = await self._read_body(request)
        with self._lock:
            message = self._channel_message(channel_id, message_id)
            self._edit_message(message, body, files)
            return _public(message)

    async def _delete_channel_message(self, request: web.Request, channel_id: str, message_id: str) -> None:
        with self._lock:
            self._channel_message(channel_id, message_id)["deleted"] = True

    async def _get_channel(self, request: web.Request, channel_id: str) -> dict:
        with self._lock:
            return dict(self._channel(channel_id))

    async def _get_member(self, request: web.Request, guild_id: str, user_id: str) -> dict:
        with self._lock:
            if int(guild_id) != self.guild_id:
                raise _ApiError(404, 10004, "Unknown Guild")
            member = self._members.get(int(user_id))
            if member is None:
                raise _ApiError(404, 10007, "Unknown Member")
            return self._member_json(member)

    # Gateway --------------------------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        """Plain text JSON frames: discord.py asks for zlib-stream in the URL but only inflates binary frames."""
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        session = None
        try:
            await ws.send_json({"op": 10, "s": None, "t": None, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}})
            async for frame in ws:
                if frame.type is not WSMsgType.TEXT:
                    continue
                packet = json.loads(frame.data)
                op, data = packet.get("op"), packet.get("d")
                if op == 1:
                    await ws.send_json({"op": 11, "s": None, "t": None, "d": None})
                elif op == 2:
                    session = await self._identify(ws, data)
                elif op == 6:
                    session = await self._resume(ws, data)
                elif op == 8 and session is not None:
                    await self._send_member_chunk(session, data)
        except ConnectionResetError:
            pass  # the client went away mid-send: its session stays resumable
        finally:
            self._sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
            if ws.close_code is not None and not getattr(ws, "closed_by_fake", False):
                self.client_close_codes.append(ws.close_code)
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict) -> _Session | None:
        if data.get("token") != self.token:
            ws.closed_by_fake = True
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        session = _Session(id=secrets.token_hex(16), shard=data.get("shard"), ws=ws)
        ready = {
            "v": 10,
            "user": {**self._user_json(self.bot_user), "verified": True, "mfa_enabled": False, "flags": 0},
            "guilds": [{"id": str(self.guild_id), "unavailable": True}],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": str(self.app_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": [],
        }
        if session.shard is not None:
            ready["shard"] = session.shard
        await self._send_event(session, "READY", ready)
        await self._send_event(session, "GUILD_CREATE", self._guild_json())
        with self._lock:
            session.ready = True
            self._session = session
            self.identify_count += 1
            self.intents = data.get("intents", 0)
        return session

    async def _resume(self, ws: web.WebSocketResponse, data: dict) -> _Session | None:
        if data.get("token") != self.token:
            ws.closed_by_fake = True
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        session = self._session
        if session is None or session.id != data.get("session_id"):
            await ws.send_json({"op": 9, "s": None, "t": None, "d": False})
            return None
        async with session.lock:
            session.ws = ws
            for seq, frame in session.events:
                if seq > (data.get("seq") or 0):
                    await ws.send_str(frame)
        await self._send_event(session, "RESUMED", {})
        with self._lock:
            self.resume_count += 1
        return session

    async def _send_member_chunk(self, session: _Session, data: dict) -> None:
        with self._lock:
            wanted = {int(user_id) for user_id in data.get("user_ids") or []}
            query = (data.get("query") or "").lower()
            if wanted:
                members = [m for m in self._members.values() if m.user.id in wanted]
            else:
                members = [m for m in self._members.values() if m.user.name.lower().startswith(query)]
            members = members[: data.get("limit") or None]
            chunk = {
                "guild_id": str(self.guild_id),
                "members": [self._member_json(m) for m in members],
                "chunk_index": 0,
                "chunk_count": 1,
                "not_found": [str(user_id) for user_id in wanted - {m.user.id for m in members}],
            }
        if data.get("nonce"):
            chunk["nonce"] = data["nonce"]
        await self._send_event(session, "GUILD_MEMBERS_CHUNK", chunk)

    async def _send_event(self, session: _Session, event: str, data: dict) -> None:
        """Number, log (for RESUME) and send one dispatch; a closed socket just leaves it for the resume."""
        async with session.lock:
            session.seq += 1
            frame = json.dumps({"op": 0, "t": event, "s": session.seq, "d": data})
            session.events.append((session.seq, frame))
            if session.ws is not None and not session.ws.closed:
                with contextlib.suppress(ConnectionResetError):
                    await session.ws.send_str(frame)

    async def _dispatch(self, session: _Session | None, event: str, data: dict) -> None:
        if session is None:
            raise RuntimeError("no gateway client has identified: start the bot and wait_ready() first")
        await self._send_event(session, event, data)

    def _dispatch_if_connected(self, event: str, data: dict, intent: int) -> None:
        """Guild updates reach a client that identified with the intent; before that, GUILD_CREATE carries them."""
        if self._session is not None and self._loop is not None and self.intents & intent:
            self._call(self._dispatch(self._session, event, data))

    async def _disconnect(self, resumable: bool) -> None:
        if not resumable:
            with self._lock:
                self._session = None
        for ws in list(self._sockets):
            ws.closed_by_fake = True
            await ws.close(code=4000, message=b"fake disconnect")
