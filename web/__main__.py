"""`python -m web`: serve the web page with uvicorn, on loopback unless a login is set."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from imagine.logs import LOG_FORMAT, tag_job_ids
from web.settings import WebSettings

logger = logging.getLogger("web")


def main() -> int:
    handler = logging.StreamHandler()
    tag_job_ids([handler])
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        settings = WebSettings()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in error.errors())
        print(f"web: bad settings (environment or .env): {problems}", file=sys.stderr)
        return 2
    if not settings.listens_on_loopback and settings.web_auth is None:
        print(
            f"web: refusing to listen on {settings.web_host} without a login: anyone who reaches it could use the "
            "GPUs. Set WEB_AUTH=user:password, or WEB_HOST=127.0.0.1 (the default) behind a proxy of your own.",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from web.app import create_app

    logger.info("serving on http://%s:%d/", settings.web_host, settings.web_port)
    uvicorn.run(create_app(settings), host=settings.web_host, port=settings.web_port, log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
