"""`python -m bot`: run the Discord bot until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
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
        asyncio.run(serve(bot, settings.discord_token.get_secret_value()))
    except discord.LoginFailure:
        logging.getLogger("bot").critical(
            "Discord refused the token (DISCORD_TOKEN): copy it again from the Developer Portal, Bot page."
        )
        return 1
    return 0


async def serve(bot: ImagineBot, token: str) -> None:
    """Run the bot until SIGTERM (`docker compose stop`) or Ctrl-C, then close it: deliveries under way
    finish, and the gateway session is closed instead of dropped."""
    log = logging.getLogger("bot")
    loop = asyncio.get_running_loop()
    signalled: asyncio.Future[str] = loop.create_future()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(
            signal_number, lambda name=signal_number.name: signalled.done() or signalled.set_result(name)
        )
    async with bot:
        running = asyncio.create_task(bot.start(token))
        await asyncio.wait([running, signalled], return_when=asyncio.FIRST_COMPLETED)
        if signalled.done():
            log.info("%s received: finishing the deliveries under way, then closing", signalled.result())
            # Stop reading the gateway first: discord.py's close races its own reader, which then closes the
            # socket with 4000 (a session Discord keeps, the bot shown online for minutes; discord.py #6719)
            # instead of the 1000 that ends the session.
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await bot.close()
        else:
            await running  # raises what stopped it, such as a refused token
    log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
