"""`edge serve`: the OpenAI-compatible HTTP API over one bundle.

    GET  /health, /v1/models
    POST /v1/chat/completions   messages, stream (SSE), max_tokens, temperature, top_p, seed, stop,
                                response_format (json_schema, json_object), tools, tool_choice
    POST /v1/completions        prompt, the same sampling fields

Starlette on uvicorn (an optional extra: the runtime stays lean for those who embed it). Each
model instance (`--parallel N`) has one worker thread that runs one generation at a time; requests
wait in a bounded queue and get 503 with Retry-After when it is full. A client that disconnects
cancels its generation before the next token (or its place in the queue). Errors use OpenAI's
shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from .errors import ConfigError, ContextError, EdgeError
from .memory import return_freed_memory
from .model import Model
from .structured import Grammar

MAX_REQUEST_BYTES = 1 << 20            # a request body larger than this is a 413
RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation, run by a worker; events go back to the request's event loop."""
    run: object                                  # run(model, cancel, emit) -> result dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    left_at: float = 0.0                         # when its client went away (time.monotonic)
    pieces_after_leaving: int = 0                # text pieces decoded after that (0 or 1: the step in flight)

    def leave(self) -> None:
        """The client is gone: the generation stops before its next token."""
        if not self.cancel.is_set():
            self.left_at = time.monotonic()
            self.cancel.set()

    def emit(self, kind: str, value=None) -> None:
        if self.left_at and kind == "piece":
            self.pieces_after_leaving += 1
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Workers:
    """N model instances, each with a thread that takes jobs from one bounded queue in turn."""

    def __init__(self, models: list[Model], *, queue_size: int):
        self.models = models
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.threads = [threading.Thread(target=self._work, args=(m,), daemon=True, name=f"edge-worker-{i}")
                        for i, m in enumerate(models)]
        self.running = 0             # generations in progress
        self.served = 0              # generations finished (or cancelled)
        self.cancelled = 0           # of those, ended because their client left
        self.cancel_ms: list[float] = []   # the last 1000 cancellations: client gone -> generation ended
        self.pieces_after_leaving = 0      # the most text pieces any cancelled generation decoded after its client left
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, f"the server is busy: {self.jobs.maxsize} requests are already waiting; retry shortly",
                           kind="server_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def _work(self, model: Model) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():                  # its client left while it waited
                self.served += 1
                self.cancelled += 1
                job.emit("done", None)
                continue
            self.running += 1
            try:
                job.emit("done", job.run(model, job.cancel, job.emit))
            except (ConfigError, ContextError) as e:
                job.emit("error", ApiError(400, str(e)))
            except EdgeError as e:
                job.emit("error", ApiError(500, str(e), kind="server_error"))
            except Exception as e:  # a bug: report it to the client, keep serving
                job.emit("error", ApiError(500, f"{type(e).__name__}: {e}", kind="server_error"))
            finally:
                model.release_memory()           # a few ms: pages the request touched go back, so RSS stays flat
                self.running -= 1
                self.served += 1
                if job.left_at:
                    self.cancelled += 1
                    self.cancel_ms = self.cancel_ms[-999:] + [(time.monotonic() - job.left_at) * 1000]
                    self.pieces_after_leaving = max(self.pieces_after_leaving, job.pieces_after_leaving)

    def close(self) -> None:
        for _ in self.threads:
            try:
                self.jobs.put_nowait(None)
            except queue.Full:
                pass


# -- request parsing --------------------------------------------------------------------------------

def _field(body: dict, name: str, kinds, default=None, *, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ApiError(400, f"'{name}' must be {what or kinds}", param=name)
    if not isinstance(v, kinds) or (check is not None and not check(v)):
        raise ApiError(400, f"'{name}' must be {what or kinds}, not {v!r}"[:300], param=name)
    return v


def sampling_fields(body: dict, *, max_tokens_limit: int, default_max: int) -> dict:
    """OpenAI's sampling fields as Model keyword arguments (only the ones the request set)."""
    n = _field(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    for name in ("logprobs", "top_logprobs", "logit_bias"):
        if body.get(name) not in (None, False, {}):
            raise ApiError(400, f"'{name}' is not supported", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported (use repetition_penalty)", param=name)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _field({"max_tokens": limit}, "max_tokens", int, default_max, check=lambda v: 1 <= v,
                     what="a positive integer")
    if max_new > max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_new}; this server allows at most {max_tokens_limit}", param="max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    out = dict(max_new_tokens=max_new, stop=tuple(stop) if stop else None,
               temperature=_field(body, "temperature", (int, float), None, check=lambda v: 0 <= v <= 2,
                                  what="a number in [0, 2]"),
               top_p=_field(body, "top_p", (int, float), None, check=lambda v: 0 < v <= 1, what="a number in (0, 1]"),
               seed=_field(body, "seed", int, None, check=lambda v: v >= 0, what="a non-negative integer"),
               top_k=_field(body, "top_k", int, None, check=lambda v: v >= 0, what="a non-negative integer"),
               min_p=_field(body, "min_p", (int, float), None, check=lambda v: 0 <= v < 1, what="a number in [0, 1)"),
               repetition_penalty=_field(body, "repetition_penalty", (int, float), None, check=lambda v: v > 0,
                                         what="a positive number"))
    return {k: v for k, v in out.items() if v is not None}


def response_schema(body: dict) -> dict | None:
    """response_format -> a JSON schema to enforce (None: free text)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "response_format.type must be 'text', 'json_object' or 'json_schema'", param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
        raise ApiError(400, "response_format.json_schema must be {name, schema}", param="response_format")
    return js.get("schema") or {"type": "object"}


# -- the app ----------------------------------------------------------------------------------------

def create_app(models: list[Model], *, name: str, api_key: str | None = None, queue_size: int = 8,
               max_tokens_limit: int | None = None, max_request_bytes: int = MAX_REQUEST_BYTES):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    return_freed_memory()                        # large buffers (a prompt's activations) are unmapped when freed
    workers = Workers(models, queue_size=queue_size)
    context = models[0].context_length
    limit = max_tokens_limit or context
    created = int(time.time())

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error",
                           code="invalid_api_key")

    async def answer(request: Request, run, *, events, body_of, headers=None):
        """Queue `run` for a worker; stream `events(job)` when given, else wait and answer with
        body_of(its result). A full queue is 503, a worker's error its ApiError."""
        job = Job(run, asyncio.get_running_loop())
        try:
            workers.submit(job)
        except ApiError as e:
            return error(e)
        if events is not None:
            return StreamingResponse(events(job), media_type="text/event-stream", headers=headers)
        result = await _wait(job, request)
        if isinstance(result, ApiError):
            return error(result)
        if result is None:                       # cancelled: its client is gone
            return JSONResponse({}, status_code=499)
        return JSONResponse(body_of(result), headers=headers)

    async def read(request: Request) -> dict:
        check_key(request)
        size = int(request.headers.get("content-length") or 0)
        if size > max_request_bytes:
            raise ApiError(413, f"the request is {size} bytes; the limit is {max_request_bytes}")
        raw = await request.body()
        if len(raw) > max_request_bytes:
            raise ApiError(413, f"the request is {len(raw)} bytes; the limit is {max_request_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if model not in (None, name):
            raise ApiError(404, f"model {model!r} does not exist; this server has {name!r}", param="model",
                           code="model_not_found")
        return body

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": name, "waiting": workers.jobs.qsize(), "running": workers.running,
                             "served": workers.served, "cancelled": workers.cancelled,
                             "cancel_ms_max": round(max(workers.cancel_ms, default=0.0), 1),
                             "pieces_after_leaving_max": workers.pieces_after_leaving})

    async def list_models(request: Request):
        try:
            check_key(request)
        except ApiError as e:
            return error(e)
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                                         "owned_by": "edge", "context_length": context}]})

    async def chat_completions(request: Request):
        try:
            body = await read(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list", param="messages")
            sampling = sampling_fields(body, max_tokens_limit=limit, default_max=limit)
            schema = response_schema(body)
            tools = body.get("tools") or None
            choice = body.get("tool_choice", "auto" if tools else "none")
            if choice == "none":
                tools = None
            elif tools is None:
                raise ApiError(400, "tool_choice needs 'tools'", param="tool_choice")
            if tools is not None and schema is not None:
                raise ApiError(400, "use either tools or response_format, not both", param="response_format")
            grammar = Grammar.tool_call(tools, choice) if tools is not None else \
                Grammar.json_schema(schema) if schema is not None else None     # checked before the prompt
            explicit_max = body.get("max_completion_tokens", body.get("max_tokens")) is not None
            prepared = models[0].prepare_chat(messages, tools=tools, reserve=sampling["max_new_tokens"] if explicit_max
                                              else min(256, context // 4))
        except ApiError as e:
            return error(e)
        except (ConfigError, ContextError) as e:
            return error(ApiError(400, str(e), param="messages"))
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not explicit_max:
            sampling["max_new_tokens"] = max(1, context - len(prepared.ids))
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        headers = {"x-edge-dropped-messages": str(prepared.dropped)} if prepared.dropped else {}

        def run(model: Model, cancel, emit):
            return model.complete_chat(prepared, cancel=cancel, on_piece=lambda p: emit("piece", p), grammar=grammar,
                                       **sampling)
        events = (lambda job: _chat_events(job, rid, name, tools is not None, include_usage)) if stream else None
        return await answer(request, run, events=events, body_of=lambda r: _chat_body(r, rid, name), headers=headers)

    async def completions(request: Request):
        try:
            body = await read(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
            sampling = sampling_fields(body, max_tokens_limit=limit, default_max=16)
            schema = response_schema(body)
            grammar = Grammar.json_schema(schema) if schema is not None else None
            ids = models[0].encode(prompt)
            if len(ids) + 1 > context:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; the context window is {context}", param="prompt",
                               code="context_length_exceeded")
        except ApiError as e:
            return error(e)
        except (ConfigError, ContextError) as e:
            return error(ApiError(400, str(e), param="prompt"))
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"

        def run(model: Model, cancel, emit):
            return model.complete_ids(ids, cancel=cancel, on_piece=lambda p: emit("piece", p), grammar=grammar,
                                      **sampling)
        events = (lambda job: _completion_events(job, rid, name)) if body.get("stream") else None
        return await answer(request, run, events=events, body_of=lambda r: {
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}],
            "usage": _usage(r)})

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", list_models),
                            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"])],
                    lifespan=_closing(workers))
    app.state.workers = workers
    return app


def _closing(workers: Workers):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        workers.close()
    return lifespan


async def _wait(job: Job, request):
    """The job's result (None if it was cancelled), cancelling it if the client disconnects."""
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.leave()
            continue
        if kind == "done":
            return value
        if kind == "error":
            return value


async def _events(job: Job):
    """(kind, value) from the worker until the job ends; cancels it when the consumer goes away."""
    kind = None
    try:
        while True:
            kind, value = await job.events.get()
            yield kind, value
            if kind in ("done", "error"):
                return
    finally:
        if kind not in ("done", "error"):
            job.leave()                 # the client disconnected: stop at the next token


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _chat_events(job: Job, rid: str, name: str, tools: bool, include_usage: bool):
    created = int(time.time())
    chunk = lambda delta, finish=None: _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                             "model": name, "choices": [{"index": 0, "delta": delta,
                                                                         "finish_reason": finish}]})
    yield chunk({"role": "assistant", "content": ""})
    held = [] if tools else None            # with tools, text that may be a call is held until it ends
    async for kind, value in _events(job):
        if kind == "piece":
            if held is not None and (held or not value.strip() or value.lstrip().startswith("{")):
                held.append(value)
            else:
                if held:                    # it was text after all
                    value, held = "".join(held) + value, []
                yield chunk({"content": value})
        elif kind == "error":
            yield _sse(value.body())
            return
        elif kind == "done" and value is not None:
            r = value
            if r.tool_calls:
                yield chunk({"tool_calls": [_tool_call_json(c, i) for i, c in enumerate(r.tool_calls)]})
            elif held:
                yield chunk({"content": "".join(held)})
            yield chunk({}, r.finish_reason)
            if include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                            "choices": [], "usage": _usage(r)})
    yield "data: [DONE]\n\n"


async def _completion_events(job: Job, rid: str, name: str):
    created = int(time.time())
    chunk = lambda text, finish=None: _sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                                            "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                                         "logprobs": None}]})
    async for kind, value in _events(job):
        if kind == "piece":
            yield chunk(value)
        elif kind == "error":
            yield _sse(value.body())
            return
        elif kind == "done" and value is not None:
            yield chunk("", value.finish_reason)
    yield "data: [DONE]\n\n"


def _tool_call_json(call, index: int) -> dict:
    return {"index": index, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}


def _usage(r) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": r.cached_tokens}}


def _chat_body(r, rid: str, name: str) -> dict:
    message = {"role": "assistant", "content": None if r.tool_calls else r.text}
    if r.tool_calls:
        message["tool_calls"] = [{k: v for k, v in _tool_call_json(c, i).items() if k != "index"}
                                 for i, c in enumerate(r.tool_calls)]
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": r.finish_reason, "logprobs": None}],
            "usage": _usage(r)}


def serve(models: list[Model], *, name: str, host: str, port: int, api_key: str | None, queue_size: int,
          log_level: str = "info") -> None:
    import uvicorn
    app = create_app(models, name=name, api_key=api_key, queue_size=queue_size)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
