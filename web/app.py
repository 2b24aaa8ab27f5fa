"""The web page's server: a FastAPI app over the service's client, as the bot is over it.

The page (`static/`) posts a job's options as JSON, follows its events over server-sent events, and
keeps its results in the browser (IndexedDB), so that a gallery survives a reload without the service
keeping results for it. Each browser is known by a random cookie: its limits (pending jobs, cooldown)
and its right to cancel are the bot's per-user ones. Everything a browser sends goes through the
shared contract; the page puts text in with `textContent`, never as HTML.

No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (the dependencies
declared inside `create_app`) as real objects.
"""

import asyncio
import base64
import logging
import re
import secrets
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from imagine.admin import format_adapters, format_queue, format_reload, format_styles
from imagine.client import ImagineClient
from imagine.contract import SCHEDULERS, JobRejected, default, parse_job_options
from imagine.followups import upscale_options, vary_options
from imagine.images import aspect_sizes
from imagine.limits import UserLimits
from imagine.logs import job_context
from imagine.store import REDIS_UNREACHABLE
from imagine.styles import StyleBook
from imagine.wire import TERMINAL_EVENTS
from web.settings import WebSettings

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
BROWSER_COOKIE = "imagine_browser"
POLL_S = 0.25
FOLLOWUPS = ("reroll", "vary", "upscale", "subtle", "strong")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
NOT_FROM_THE_PAGE = ("safety_checker",)
"""Options a browser may not set: the safety checker stays as the workers' operator set it."""
BODY_MARGIN = 64 * 1024
"""What a request body may hold besides an image (as base64): the options, JSON's punctuation."""


def create_app(settings: WebSettings, client: ImagineClient | None = None) -> FastAPI:
    client = client or ImagineClient(settings, client_name="web")
    limits = UserLimits(client.records(), settings.max_pending_per_browser, settings.browser_cooldown_s)
    styles = StyleBook(settings.styles_file, settings.limits)
    app = FastAPI(title="imagine", docs_url=None, redoc_url=None, openapi_url=None)
    basic = HTTPBasic(auto_error=False)

    def login(credentials: HTTPBasicCredentials | None, expected) -> None:
        user, _, password = expected.get_secret_value().encode().partition(b":")
        given = (credentials.username, credentials.password) if credentials else ("", "")
        # compare_digest on both, always: the time taken says nothing about which was wrong.
        if not (secrets.compare_digest(given[0].encode(), user) & secrets.compare_digest(given[1].encode(), password)):
            raise HTTPException(401, "log in", headers={"WWW-Authenticate": 'Basic realm="imagine"'})

    Credentials = Annotated[HTTPBasicCredentials | None, Depends(basic)]

    def user(request: Request, credentials: Credentials) -> str:
        """The browser's id (its cookie), once the page's login (WEB_AUTH), if any, is given."""
        if settings.web_auth is not None:
            login(credentials, settings.web_auth)
        return request.cookies.get(BROWSER_COOKIE) or ""

    def operator(credentials: Credentials) -> None:
        if settings.web_admin_auth is None:
            raise HTTPException(404, "the operator's page is off: set WEB_ADMIN_AUTH=user:password")
        login(credentials, settings.web_admin_auth)

    Browser = Annotated[str, Depends(user)]
    Operator = Annotated[None, Depends(operator)]

    async def own_job(job_id: str, browser: str):
        """The job's record, when this browser started it; 404 otherwise (another browser's, the bot's)."""
        record = await asyncio.to_thread(client.job, job_id) if JOB_ID.match(job_id) else None
        if record is None or record.owner != f"web:{browser}":
            raise HTTPException(404, "no such job of this browser (or it has expired)")
        return record

    @app.exception_handler(JobRejected)
    async def refused(request: Request, refusal: JobRejected) -> JSONResponse:
        return JSONResponse({"error": str(refusal), "option": refusal.option}, status_code=400)

    @app.exception_handler(REDIS_UNREACHABLE[0])
    @app.exception_handler(REDIS_UNREACHABLE[1])
    async def unreachable(request: Request, error: Exception) -> JSONResponse:
        logger.warning("Redis is not answering: %s", error)
        return JSONResponse({"error": "The service's queue is not answering; try again in a moment."}, 503)

    max_body = settings.limits.max_image_bytes * 4 // 3 + BODY_MARGIN

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        """A body is refused by its declared length before it is read (FastAPI reads it before any login
        check): an image as large as MAX_IMAGE_BYTES allows, and the options."""
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"error": "send the request's Content-Length"}, 411)
            if int(length) > max_body:
                return JSONResponse({"error": f"the request is over {max_body} bytes: send a smaller image"}, 413)
        return await call_next(request)

    @app.middleware("http")
    async def browser_cookie(request: Request, call_next):
        """Every browser gets a random id the first time, kept for a year: its jobs, limits and right to cancel."""
        browser = request.cookies.get(BROWSER_COOKIE)
        if not browser:
            browser = secrets.token_urlsafe(18)
            # This request's handlers see it too, as the browser's next requests will send it.
            others = [(name, value) for name, value in request.scope["headers"] if name != b"cookie"]
            cookies = "; ".join([*(f"{k}={v}" for k, v in request.cookies.items()), f"{BROWSER_COOKIE}={browser}"])
            request.scope["headers"] = [*others, (b"cookie", cookies.encode())]
        response: Response = await call_next(request)
        response.set_cookie(BROWSER_COOKIE, browser, max_age=365 * 86400, httponly=True, samesite="strict")
        return response

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthcheck", include_in_schema=False)
    async def healthcheck() -> dict[str, str]:
        """For the container's health check: the one page served without the login."""
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page(browser: Browser) -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/admin", include_in_schema=False)
    async def admin_page(_: Operator) -> FileResponse:
        return FileResponse(STATIC / "admin.html")

    @app.get("/api/config")
    async def config(browser: Browser) -> dict[str, Any]:
        """What the page's form offers: every option with its range and default, from the service's limits."""
        service_limits = settings.limits
        workers = await asyncio.to_thread(client.workers)
        sizes = aspect_sizes(service_limits.min_side, service_limits.max_side, service_limits.max_pixels)
        offered = await asyncio.to_thread(styles.styles)
        return {
            "ranges": service_limits.ranges(),
            "defaults": {name: default(name) for name in ("num_inference_steps", "guidance_scale", "strength")},
            "schedulers": SCHEDULERS,
            "aspects": sizes,
            "adapters": sorted({name for status in workers.values() for name in status.adapters}),
            "default_adapter": next((status.default_adapter for status in workers.values()), None),
            "max_adapters": service_limits.max_adapters,
            "max_image_bytes": service_limits.max_image_bytes,
            "styles": [{"name": style.name, "description": style.description} for style in offered.values()],
        }

    async def submit(browser: str, options: dict[str, Any]) -> dict[str, Any]:
        checked = await asyncio.to_thread(parse_job_options, options, settings.limits)
        await asyncio.to_thread(limits.admit, browser)
        owner = f"web:{browser}"
        try:
            job = await asyncio.to_thread(client.submit, checked, owner, None, limits.max_pending)
        except JobRejected:
            await asyncio.to_thread(limits.forgive, browser)
            raise
        stats = await asyncio.to_thread(client.queue_stats)
        with job_context(job.job_id):
            logger.info("job %s submitted by browser %s", job.job_id, browser[:6])
        return {
            "job_id": job.job_id,
            "position": job.position,
            "seed": job.options.seed,
            "estimated_wait_s": stats.estimated_wait_s(job.position),
        }

    @app.post("/api/jobs")
    async def new_job(body: dict[str, Any], browser: Browser) -> dict[str, Any]:
        """A job from the form: its options as the contract names them (the image as base64), and a style."""
        options = body.get("options")
        if not isinstance(options, dict):
            raise JobRejected('the request must be {"options": {...}} with the job\'s options')
        for name in NOT_FROM_THE_PAGE:
            if name in options:
                raise JobRejected(f"{name} cannot be set from the web page", name)
        return await submit(browser, await asyncio.to_thread(styles.apply, options))

    @app.post("/api/jobs/{job_id}/followup")
    async def followup(job_id: str, body: dict[str, Any], browser: Browser) -> dict[str, Any]:
        """Reroll, Variations, Upscale or Vary of a result, as the bot's buttons do: `action`, the image's
        `index`, and for Upscale and Vary the image itself (the browser keeps it; the service let it go)."""
        record = await own_job(job_id, browser)
        action, index = body.get("action"), body.get("index", 0)
        count = record.options.get("num_images_per_prompt", 1)
        if action not in FOLLOWUPS or type(index) is not int or not 0 <= index < count:
            raise JobRejected(
                f"action must be one of {', '.join(FOLLOWUPS)}, with the image's index (0 to {count - 1})"
            )
        options = dict(record.options)
        if action == "reroll":
            options["seed"] = None
        elif action == "vary":  # the seeds right after the image's, past its siblings'
            options["seed"] = options["seed"] + options["num_images_per_prompt"] * (index + 1)
        else:
            png = _image(body.get("image"))
            if action == "upscale":
                options = upscale_options(options, png, options["seed"] + index, settings.limits)
            else:
                options = vary_options(options, png, action)
        return await submit(browser, options)

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, browser: Browser) -> EventSourceResponse:
        """The job's events as server-sent events, from the first, until its last (done, failed, cancelled)."""
        await own_job(job_id, browser)
        follower = client.follower(job_id)

        async def stream():
            while not await request.is_disconnected():
                try:
                    polled = await asyncio.to_thread(follower.poll)
                except LookupError as error:
                    yield {"event": "lost", "data": f"{error}; start it again"}
                    return
                for event in polled:
                    yield {"event": event.type, "data": event.model_dump_json(exclude_unset=True)}
                    if event.type in TERMINAL_EVENTS:
                        return
                await asyncio.sleep(POLL_S)

        return EventSourceResponse(stream(), ping=15)

    @app.get("/api/jobs/{job_id}/result")
    async def result(job_id: str, browser: Browser) -> dict[str, Any]:
        await own_job(job_id, browser)
        found = await asyncio.to_thread(client.result, job_id)
        if found is None:
            raise HTTPException(404, "no result: the job has not finished, or its result was delivered or expired")
        images = [
            {**info.model_dump(), "png": base64.b64encode(png).decode(), "file": found.file_name(info)}
            for info, png in found.delivered_images()
        ]
        return {"meta": found.meta.model_dump(exclude_unset=True), "images": images}

    @app.post("/api/jobs/{job_id}/delivered")
    async def delivered(job_id: str, browser: Browser) -> dict[str, bool]:
        """The browser has the result: the service may let it go."""
        await own_job(job_id, browser)
        return {"confirmed": await asyncio.to_thread(client.confirm_delivery, job_id)}

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str, browser: Browser) -> dict[str, str]:
        await own_job(job_id, browser)
        return {"outcome": await asyncio.to_thread(client.cancel, job_id)}

    @app.get("/api/admin/status")
    async def admin_status(_: Operator) -> dict[str, str]:
        """The same tables as `imagine-admin queue`, `adapters` and `styles`."""
        queue, adapters, style_table = await asyncio.gather(
            asyncio.to_thread(format_queue, client),
            asyncio.to_thread(format_adapters, client),
            asyncio.to_thread(format_styles, styles),
        )
        return {"queue": queue, "adapters": adapters, "styles": style_table}

    @app.post("/api/admin/reload")
    async def admin_reload(body: dict[str, Any], _: Operator) -> dict[str, Any]:
        name = body.get("adapter") or None
        outcome = await asyncio.to_thread(client.reload_adapters, name, settings.reload_timeout_s)
        refused = any(not answer.ok for answers in outcome.answers.values() for answer in answers)
        return {"table": format_reload(outcome), "ok": bool(outcome.answers) and not refused}

    return app


def _image(encoded: Any) -> bytes:
    if not isinstance(encoded, str):
        raise JobRejected("Upscale and Vary need the image: its PNG, base64-encoded, as `image`")
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        raise JobRejected("image must be the base64 of the result's PNG") from None
