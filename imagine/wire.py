"""What crosses between the processes through Redis, typed: a job's events, its result's metadata, a
worker's status and its answers to a reload, the refused messages. The worker builds these, the bot
and the CLIs read them (`imagine/contract.py` types what goes in: the job's options).

Each is a pydantic model whose JSON is what travels (`to_json`). Only the fields a writer set are
written, so an absent optional field stays absent; fields a newer version adds are kept by an older
reader (extra="allow"), so a rolling upgrade never makes a reader drop an event. A record that does
not parse is unreadable: the store skips it and logs it once.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    STEP = "step"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FailureReason(StrEnum):
    """Why a job failed; a fixed set, so that a metric's label stays small."""

    REJECTED = "rejected"
    """Its options were refused (by the worker: the front end's check was skipped or older)."""
    ADAPTER = "adapter"
    """The adapter it asks for is missing or was refused."""
    OUT_OF_MEMORY = "out_of_memory"
    TIMEOUT = "timeout"
    """It rendered longer than JOB_TIME_LIMIT_S."""
    WORKER_LOST = "worker_lost"
    """Its worker died under it MAX_JOB_ATTEMPTS times."""
    MESSAGE_LOST = "message_lost"
    """Its message went missing from the queue MAX_JOB_ATTEMPTS times (a purged queue)."""
    INTERNAL = "internal"
    """Anything else: a bug to read in the worker's log."""


class AdapterLoadOutcome(StrEnum):
    LOADED = "loaded"
    """A new version."""
    UNCHANGED = "unchanged"
    """The same files as the version serving."""
    FAILED = "failed"
    """Refused; the previous version keeps serving."""


class DeadLetterKind(StrEnum):
    """Why a worker refused a message of the job queue."""

    UNDECODABLE = "undecodable"
    """Not a kombu message of JSON."""
    NOT_A_JOB = "not_a_job"
    """Another task, or not a job's arguments."""
    UNKNOWN_JOB = "unknown_job"
    """A job never recorded, expired, or whose record is unreadable."""
    DISAGREES = "disagrees"
    """Its options are not those recorded with the job."""


class WireModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json(self) -> str:
        return self.model_dump_json(exclude_unset=True)


# Events ---------------------------------------------------------------------------------------------


class _Event(WireModel):
    """A job's event. `job_id` and `ts` (Redis's clock) are set by the store as it writes the event."""

    model_config = ConfigDict(extra="allow", frozen=True)

    job_id: str = ""
    ts: float = 0.0

    def model_post_init(self, context: Any, /) -> None:
        self.__pydantic_fields_set__.add("type")  # the type always goes on the wire, though it has a default


class Queued(_Event):
    """Waiting in the queue; sent when it is submitted, whenever its place changes, and when it is queued again."""

    type: Literal[EventType.QUEUED] = EventType.QUEUED
    position: int | None = None
    """1 = next; None once the queue no longer holds it."""
    message: str | None = None
    """Why it is queued again (its worker stopped, its message was lost), for its user."""


class AdapterUse(WireModel):
    """One adapter a job renders with: its name, the version serving it, and its scale."""

    name: str
    version: str
    scale: float


class Started(_Event):
    type: Literal[EventType.STARTED] = EventType.STARTED
    worker: str
    attempt: int
    adapter: str | None
    """The (first) adapter it renders with; None for the base model."""
    adapters: list[AdapterUse] = []
    """Every adapter it renders with (several when the job blends them)."""
    seeds: list[int]
    warnings: list[str] = []


class Step(_Event):
    type: Literal[EventType.STEP] = EventType.STEP
    step: int
    total: int
    preview_png: str | None = None
    """A small PNG approximating the first image, base64-encoded (throttled by PREVIEW_INTERVAL_S)."""


class Done(_Event):
    type: Literal[EventType.DONE] = EventType.DONE
    worker: str
    images: int
    withheld: int
    """Images the safety checker withheld, of `images`."""
    render_s: float
    queue_wait_s: float
    warnings: list[str] = []


class Failed(_Event):
    type: Literal[EventType.FAILED] = EventType.FAILED
    reason: FailureReason
    message: str
    """What went wrong, written for the job's user."""


class Cancelled(_Event):
    type: Literal[EventType.CANCELLED] = EventType.CANCELLED
    message: str = ""


JobEvent = Annotated[Queued | Started | Step | Done | Failed | Cancelled, Field(discriminator="type")]
TerminalEvent = Done | Failed | Cancelled
"""A job's last event: it is written with the job's final state, in one step."""
TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.FAILED, EventType.CANCELLED})
JOB_EVENT = TypeAdapter(JobEvent)


# A job's result ------------------------------------------------------------------------------------


class ImageInfo(WireModel):
    index: int
    seed: int
    withheld: bool
    """The safety checker withheld it: the result has no PNG for it."""
    file: str | None = None
    """Where a front end saved it (the `imagine` CLI's JSON)."""


class ResultMeta(WireModel):
    """Everything about a finished render: its options as the worker applied them, and where and how it ran."""

    job_id: str
    prompt: str
    negative_prompt: str
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    num_images_per_prompt: int
    adapter_scale: float
    scheduler: str
    """The scheduler's class (`PNDMScheduler`), which `default` resolves to."""
    safety_checker: bool
    seeds: list[int]
    adapter: str | None
    """The first adapter it rendered with (the one, unless it blended several); None for the base model."""
    adapter_version: str | None
    adapters: list[AdapterUse] = []
    """Every adapter it rendered with, each with its version and scale."""
    init_image: str | None = None
    """img2img: the digest of the image it started from (`imagine.images.image_digest`); absent otherwise."""
    strength: float | None = None
    """img2img: how far it moved from that image."""
    style: str | None = None
    """The style its prompt was expanded with (`prompt` is the expanded one)."""
    base_model: str
    images: list[ImageInfo]
    worker: str
    device: str
    attempt: int
    queue_wait_s: float
    render_s: float
    warnings: list[str]


# Workers -------------------------------------------------------------------------------------------


class AdapterInfo(WireModel):
    name: str
    internal_name: str
    layout: str
    """peft, diffusers or kohya."""
    version: str
    """The first 12 hex digits of the SHA-256 of its files."""
    modules: int
    loaded_at: float
    file: str
    """The file that serves (and its twin that agrees with it)."""


class WorkerStatus(WireModel):
    """What a worker publishes with each heartbeat; `heartbeat_at` is set by the store (Redis's clock)."""

    device: str
    base_model: str
    default_adapter: str | None = None
    adapters: dict[str, AdapterInfo]
    adapter_errors: dict[str, str] = {}
    """Adapters whose current files it refused, and why; a version of them may still serve."""
    current_job: str | None = None
    """The job it renders (the first of a batch); None from the moment its render is over."""
    current_jobs: list[str] = []
    """Every job of the batch it renders."""
    jobs_done: int
    heartbeat_at: float = 0.0


class ReloadAnswer(WireModel):
    """A worker's answer for one adapter of a reload request."""

    worker: str
    adapter: str
    ok: bool
    version: str | None = None
    """The version serving now: the new one, or (refused) the previous one, None if none."""
    previous_version: str | None = None
    layout: str | None = None
    file: str | None = None
    error: str | None = None
    seconds: float = 0.0


class DeadLetter(WireModel):
    """A message of the job queue a worker refused, kept for an operator to look at."""

    at: float = 0.0
    """When it was refused, by Redis's clock (set by the store)."""
    kind: DeadLetterKind
    reason: str
    queue: str
    task_id: str | None = None
    worker: str
    bytes: int
    message: str
    """The message as it was on the queue (its first DEAD_LETTER_BYTES), prompts and all."""
