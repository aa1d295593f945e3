"""`sdft serve`: an OpenAI-compatible server over a learner, which learns from the demonstrations it is sent.

    GET  /v1/models                 the served model
    POST /v1/chat/completions       chat (streamed with "stream": true), answered by the current version
    POST /v1/completions            plain text completion
    POST /v1/demonstrations         records to learn from; {"completion_id", "demonstration"} corrects a completion
    POST /v1/rounds                 start a round now (also: after --round-every demonstrations, every --round-interval)
    GET  /v1/rounds/{n}             a round's stage, decision, numbers and live training curve
    GET  /v1/versions               versions, and which one is served
    GET  /v1/status                 everything `sdft learn status --json` shows, plus what is served and training
    GET  /                          the dashboard

Write endpoints (demonstrations, rounds) need `Authorization: Bearer KEY` when the server has a key.
Every response says which version answered (`model` field and the `x-selfdistill-version` header).
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and a bad request stores
nothing.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from selfdistill.errors import UserError
from selfdistill.learner import Learner
from selfdistill.learner import database as db
from selfdistill.serve.dashboard import register_dashboard
from selfdistill.serve.engines import GenerationRequest
from selfdistill.serve.host import ModelHost, Served, make_serving_engine
from selfdistill.serve.rounds import RoundBusy, RoundRunner


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_request_bytes: int = 1_000_000
    max_records: int = 1_000
    max_new_tokens: int = 256  # the most a request may ask for
    round_every: int | None = None  # start a round once this many demonstrations are pending
    round_interval: float | None = None  # or every this many seconds while some are pending
    engine: str = "decode"  # decode, vllm, or the URL of a vLLM server (`selfdistill.serve.engines`)
    engine_precision: str = "auto"  # the in-process vLLM engine's: auto, fp32 or bf16
    engine_api_key: str | None = None  # the external vLLM server's key, if it has one
    round_devices: str | None = None  # the GPUs a round trains on (CUDA_VISIBLE_DEVICES), e.g. "1,2"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False


class DemonstrationIn(BaseModel):
    prompt: str | list[Message] | None = None
    completion_id: str | None = None
    demonstration: str = Field(min_length=1)
    task: str | None = None
    context: str | None = None
    answer: Any = None


class DemonstrationsRequest(BaseModel):
    records: list[DemonstrationIn] | None = None
    task: str = "default"  # the task of every record that names none
    # One record may also be sent as the body itself.
    prompt: str | list[Message] | None = None
    completion_id: str | None = None
    demonstration: str | None = None
    context: str | None = None
    answer: Any = None


class RoundRequest(BaseModel):
    settings: list[str] = Field(default_factory=list)  # section.key=value, for this round only


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class BodyLimit:
    """Refuses a request body over `limit` bytes (413) before the application reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes")
            return message

        return await self.app(scope, limited, send)


class LeasedStream(Response):
    """Server-sent events generated on a leased version: the lease is taken before the headers (which name the
    version) and given back when the stream ends or its client leaves (then its generation is stopped)."""

    def __init__(self, host: ModelHost, events_of: Callable[[Served], Iterator[str]]):
        super().__init__(media_type="text/event-stream")
        self.host, self.events_of = host, events_of

    async def __call__(self, scope, receive, send):
        lease = self.host.lease()
        served = await run_in_threadpool(lease.__enter__)  # waits while a version is being swapped in
        events = self.events_of(served)
        try:
            headers = {"x-selfdistill-version": str(served.version)}
            await StreamingResponse(events, media_type="text/event-stream", headers=headers)(scope, receive, send)
        finally:
            try:
                events.close()  # a client that left: stops the generation
            except ValueError:  # still running in a worker thread: closed when that thread lets go of it
                pass
            lease.__exit__(None, None, None)


class Service:
    """What the routes share: the learner, the served model, the round runner, the settings, and the checks
    and bookkeeping every request goes through."""

    def __init__(self, learner: Learner, host: ModelHost, runner: RoundRunner, settings: ServeSettings):
        self.learner, self.host, self.runner, self.settings = learner, host, runner, settings
        self.model_id = learner.root.name

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key and request.headers.get("authorization") != f"Bearer {key}":
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", kind="authentication_error")

    def check_model(self, name: str | None) -> None:
        if name not in (None, self.model_id):
            raise ApiError(404, f"model {name!r} does not exist; this server serves {self.model_id!r}", "model")

    def budget(self, request) -> int:
        asked, most = _asked(request), self.settings.max_new_tokens
        if asked is not None and asked > most:
            raise ApiError(400, f"max_tokens: at most {most} on this server", "max_tokens")
        return asked or most

    def generation(self, request) -> GenerationRequest:
        return GenerationRequest(self.budget(request), request.temperature, request.top_p, request.seed)

    def record(self, kind: str, served: Served, prompt, text: str, completion_id: str | None = None) -> str:
        """Store what was served, so a correction by its id trains on exactly this prompt."""
        completion_id = completion_id or _new_id(kind)
        stored = db.Completion(
            id=completion_id, version=served.version, kind=kind, prompt={"prompt": prompt}, output=text
        )
        with self.learner.db.transaction() as session:
            session.add(stored)
        return completion_id

    def respond(self, kind: str, request, prompt, ids_of: Callable[[Served], list[int]]):
        """Answer on the version current when the request starts, held (`ModelHost.lease`) to its last token."""
        generation = self.generation(request)  # refused before a stream starts, not half-way through it
        if request.stream:
            return LeasedStream(self.host, lambda served: _sse(self, kind, served, prompt, ids_of(served), generation))
        with self.host.lease() as served:
            prompt_ids = ids_of(served)
            tokens = list(served.stream(prompt_ids, generation))
        headers = {"x-selfdistill-version": str(served.version)}
        text, finish = _text(served, tokens)
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text})
        body = {
            "id": self.record(kind, served, prompt, text),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": f"v{served.version}",
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt_ids) + len(tokens),
            },
        }
        return JSONResponse(body, headers=headers)


def create_app(workdir, settings: ServeSettings | None = None, *, host: ModelHost | None = None):
    """The server's application over the learner in `workdir` (see the module's docstring), wrapped in the
    request-size limit; `.state` reaches the learner, host, runner and settings."""
    settings = settings or ServeSettings()
    learner = Learner(workdir, echo=lambda line: None)
    if host is None:
        engine = make_serving_engine(
            settings.engine, precision=settings.engine_precision, api_key=settings.engine_api_key
        )
        host = ModelHost(learner, engine)
    runner = RoundRunner(learner, settings.round_every, settings.round_interval, settings.round_devices)
    service = Service(learner, host, runner, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()  # promotions and rollbacks are served from the next request on
        runner.start_schedule()
        yield
        host.stop()
        runner.stop()

    app = FastAPI(title="selfdistill", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.learner, app.state.host, app.state.runner, app.state.settings = learner, host, runner, settings

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where)

    _inference_routes(app, service)
    _learning_routes(app, service)
    register_dashboard(app)
    limited = BodyLimit(app, settings.max_request_bytes)
    limited.state = app.state
    return limited


def _inference_routes(app: FastAPI, service: Service) -> None:
    @app.get("/v1/models")
    def models():
        model = {"id": service.model_id, "object": "model", "created": 0, "owned_by": "selfdistill"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest):
        service.check_model(request.model)
        messages = [m.model_dump() for m in request.messages]
        if messages[-1]["role"] != "user":
            raise ApiError(400, "messages: the last message must be the user's", "messages")
        return service.respond("chat", request, messages, lambda served: served.chat_ids(messages))

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        service.check_model(request.model)
        return service.respond("text", request, request.prompt, lambda served: served.text_ids(request.prompt))


def _learning_routes(app: FastAPI, service: Service) -> None:
    learner, runner = service.learner, service.runner

    @app.post("/v1/demonstrations")
    def demonstrations(body: DemonstrationsRequest, request: Request):
        service.authorize(request)
        rows_by_task = _rows_by_task(learner, body, service.settings.max_records)
        counts = learner.add_tasks(rows_by_task)  # one transaction: all of the request's records, or none
        return {"added": sum(c["added"] for c in counts), "tasks": counts, "round_started": runner.maybe_start()}

    @app.post("/v1/rounds")
    def start_round(request: Request, body: RoundRequest | None = None):
        service.authorize(request)
        try:
            number = runner.start(body.settings if body else ())
        except RoundBusy as exc:
            raise ApiError(409, str(exc), kind="conflict") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse(_round(learner, number), status_code=202)

    @app.get("/v1/rounds/{number}")
    def get_round(number: int):
        return _round(learner, number)

    @app.get("/v1/versions")
    def versions():
        status = learner.status()
        served = service.host.served.version
        return {"current_version": status["current_version"], "served_version": served, "versions": status["versions"]}

    @app.get("/v1/status")
    def status():
        data = learner.status()
        data["served_version"] = service.host.served.version
        data["engine"] = service.host.engine.name
        data["round_running"] = runner.running()
        running = [r for r in data["rounds"] if r["stage"] != "done"]
        data["training"] = _training_curve(learner, running[-1]["number"]) if running else None
        return data


def _rows_by_task(learner: Learner, body: DemonstrationsRequest, most: int) -> dict[str, list[dict]]:
    """The request's records as record fields per task, every one checked before any is stored."""
    from selfdistill.data.records import records_from

    items = body.records
    if items is None:
        if body.demonstration is None:
            raise ApiError(400, "records: give a list of records, or one record's fields", "records")
        items = [DemonstrationIn(**body.model_dump(exclude={"records", "task"}, exclude_none=True))]
    if not items:
        raise ApiError(400, "records: empty; give at least one record", "records")
    if len(items) > most:
        raise ApiError(413, f"records: at most {most} per request", "records")
    rows_by_task: dict[str, list[dict]] = {}
    for k, item in enumerate(items):
        rows_by_task.setdefault(item.task or body.task, []).append(_row(learner, item, f"records[{k}]"))
    for task, rows in rows_by_task.items():
        try:
            records_from(rows, f"POST /v1/demonstrations (task {task})")
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
    return rows_by_task


def _new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def _asked(request) -> int | None:
    return getattr(request, "max_completion_tokens", None) or request.max_tokens


def _text(served: Served, tokens: list[int]) -> tuple[str, str]:
    """The completion's text without its stop token, and OpenAI's finish reason."""
    finished = bool(tokens) and tokens[-1] in served.stop_ids
    text = served.tokenizer.decode(tokens[:-1] if finished else tokens, skip_special_tokens=True)
    return text, "stop" if finished else "length"


def _sse(service: Service, kind: str, served: Served, prompt, prompt_ids: list[int], generation) -> Iterator[str]:
    """Server-sent events as OpenAI streams them: one chunk per decoded piece of text, then [DONE]."""
    completion_id = _new_id(kind)
    created = int(time.time())

    def chunk(delta: str | None, finish: str | None, role: str | None = None) -> str:
        if kind == "chat":
            said = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": {"role": role, **said} if role else said, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            obj = "text_completion"
        body = {"id": completion_id, "object": obj, "created": created, "model": service.model_id, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    if kind == "chat":
        yield chunk("", None, role="assistant")
    tokens: list[int] = []
    sent = ""
    for token in served.stream(prompt_ids, generation):
        tokens.append(token)
        if token in served.stop_ids:
            break
        text = served.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(sent) and not text.endswith("\ufffd"):  # whole characters only
            yield chunk(text[len(sent) :], None)
            sent = text
    text, finish = _text(served, tokens)
    if len(text) > len(sent):
        yield chunk(text[len(sent) :], None)
    service.record(kind, served, prompt, text, completion_id)
    yield chunk(None, finish)
    yield "data: [DONE]\n\n"


def _row(learner: Learner, item: DemonstrationIn, where: str) -> dict:
    """A record's fields from a request item; a correction takes the prompt its completion was given."""
    if item.completion_id is not None:
        with learner.db.transaction() as session:
            stored = session.get(db.Completion, item.completion_id)
        if stored is None:
            raise ApiError(
                404,
                f"{where}.completion_id: no completion {item.completion_id!r} was served here",
                f"{where}.completion_id",
            )
        prompt = stored.prompt["prompt"]
    elif item.prompt is None:
        raise ApiError(400, f"{where}: give a prompt (text or messages) or a completion_id", f"{where}.prompt")
    else:
        prompt = item.prompt if isinstance(item.prompt, str) else [m.model_dump() for m in item.prompt]
    row = {"prompt": prompt, "demonstration": item.demonstration}
    if item.context is not None:
        row["context"] = item.context
    if item.answer is not None:
        row["answer"] = item.answer
    if item.completion_id is not None:
        row["completion_id"] = item.completion_id
    return row


def _round(learner: Learner, number: int) -> dict:
    found = learner.round_info(number)
    if found is None:
        raise ApiError(404, f"no round {number}", "number")
    return {**found, "training": _training_curve(learner, number)}


def _training_curve(learner: Learner, number: int) -> list[dict]:
    """The round's training steps so far (step, loss), from its metrics.jsonl."""
    path = learner.root / "rounds" / f"round-{number:04d}" / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        steps.append({"step": row.get("step"), "loss": row.get("loss")})
    return steps
