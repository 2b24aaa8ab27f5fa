"""`python -m bot`: run the Discord bot until stopped."""

from __future__ import annotations

import logging
import sys

import discord
import pydantic
import yarl

from bot.app import ImagineBot
from bot.settings import BotSettings
from imagine.client import ImagineClient
from imagine.logs import LOG_FORMAT, tag_job_ids


def main() -> int:
    handler = logging.StreamHandler()
    tag_job_ids([handler])
    discord.utils.setup_logging(handler=handler, formatter=logging.Formatter(LOG_FORMAT), level=logging.INFO)
    try:
        settings = BotSettings()
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
        logging.getLogger("bot").critical("bad settings (environment or .env): %s", problems)
        return 2
    if settings.discord_api_base:
        discord.http.Route.BASE = settings.discord_api_base
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    bot = ImagineBot(settings, ImagineClient(settings, client_name="discord"))
    try:
        bot.run(settings.discord_token.get_secret_value(), log_handler=None)
    except discord.LoginFailure:
        logging.getLogger("bot").critical(
            "Discord refused the token (DISCORD_TOKEN): copy it again from the Developer Portal, Bot page."
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
