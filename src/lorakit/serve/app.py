"""OpenAI's HTTP API over an `Engine`: /v1/models, /v1/completions, /v1/chat/completions (server-sent events
when `stream` is true), vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, /health and /metrics.

`model` in a request names the base model or an adapter; an adapter folder under --adapter-dir loads on
first use. Every refused request gets a 4xx with OpenAI's error body
{"error": {"message", "type", "param", "code"}}; nothing a client sends reaches the engine unchecked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.examples import chat_prompt_ids
from ..errors import AdapterNotFoundError, ConfigError, LoraError
from .adapters import AdapterRegistry, ForbiddenPath
from .engine import Engine, Event, QueueFull, Request
from .sampling import SamplingParams

log = logging.getLogger("lorakit.serve")


@dataclass
class Limits:
    """What one request may ask for. None: the model's context length."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_tokens: int = 1024  # the largest max_tokens a request may set, and chat's default
    max_stop: int = 4


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# fields of OpenAI's requests that this server does not implement, and the values that ask for nothing
_NEUTRAL = {"n": (1, None), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (0.0, None),
            "frequency_penalty": (0.0, None), "logit_bias": (None, {}), "echo": (False,), "best_of": (None, 1),
            "suffix": (None, "")}


# -- request bodies ---------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields that change nothing here (user, ...)

    model: str
    # null means the default, as OpenAI's API reads it
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1 << 31)
    seed: int | None = Field(None, ge=-(1 << 63), le=(1 << 64) - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    logprobs: Any = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Body):
    prompt: str | list[int] | list[str]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str


class UnloadBody(BaseModel):
    lora_name: str


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, base_name: str, *, api_key: str | None = None, limits: Limits | None = None,
               metrics=None) -> FastAPI:
    """The ASGI app serving `engine` (started and stopped with the app). `base_name` is the `model` that
    means the base model; `api_key`, when given, is required as `Authorization: Bearer <key>` on /v1/."""
    limits = limits or Limits()
    tokenizer, registry = engine.tokenizer, engine.registry
    config = engine.model.config
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1 << 30
    max_prompt = min(limits.max_prompt_tokens or context, context - 1)
    created = int(time.time())

    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.on_startup.append(engine.start)
    app.router.on_shutdown.append(engine.stop)

    def refuse(error: ApiError) -> JSONResponse:
        if metrics is not None:
            metrics.rejected.labels(str(error.status)).inc()
        return error.response()

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return refuse(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return refuse(ApiError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, exc: RequestValidationError):
        return refuse(_invalid(exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("request failed")
        return refuse(ApiError(500, f"internal error ({type(exc).__name__})", "internal_error"))

    async def auth(request: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text() if metrics is not None else b"", media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models():
        def card(name: str, parent: str | None, **extra) -> dict:
            return {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "root": name,
                    "parent": parent, "max_model_len": context, **extra}

        data = [card(base_name, None)]
        if registry is not None:
            names = registry.names()
            data += [card(n, base_name, vllm_warnings=registry.warnings.get(n, [])) for n in names]
            data += [card(n, base_name) for n in _discoverable(registry) if n not in names]
        return {"object": "list", "data": data}

    @v1.post("/load_lora_adapter")
    async def load_lora(request: HttpRequest):
        body = await _parse(request, LoadBody, limits)
        if registry is None:
            raise ApiError(400, "this server has no adapter registry.")
        if body.lora_name == base_name:
            raise ApiError(400, f"{body.lora_name!r} names the base model; pick another lora_name.", param="lora_name")
        try:
            problems = await asyncio.to_thread(registry.add, body.lora_name, body.lora_path)
        except ForbiddenPath as exc:
            raise ApiError(403, str(exc), "permission_error", "lora_path") from exc
        except LoraError as exc:
            raise ApiError(400, str(exc), param="lora_path") from exc
        note = "".join(f"\nWarning: {p}" for p in problems)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.{note}")

    @v1.post("/unload_lora_adapter")
    async def unload_lora(request: HttpRequest):
        body = await _parse(request, UnloadBody, limits)
        if registry is None:
            raise ApiError(404, f"no adapter named {body.lora_name!r} is loaded.", "not_found_error", "lora_name")
        try:
            registry.remove(body.lora_name)
        except AdapterNotFoundError as exc:
            raise ApiError(404, str(exc), "not_found_error", "lora_name", "model_not_found") from exc
        engine.wake()  # it leaves the model once no running row uses it
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    async def adapter_of(name: str) -> str | None:
        if name == base_name:
            return None
        if registry is not None:
            try:
                if await asyncio.to_thread(registry.resolve, name):
                    return name
            except LoraError as exc:
                raise ApiError(400, str(exc), param="model") from exc
        raise ApiError(404, f"the model {name!r} does not exist; GET /v1/models lists the base and its adapters.",
                       "not_found_error", "model", "model_not_found")

    def sampling(body: _Body, prompt_len: int, max_tokens: int | None, default_max: int | None) -> SamplingParams:
        for field, allowed in _NEUTRAL.items():
            if getattr(body, field, allowed[0]) not in allowed:
                raise ApiError(400, f"{field} is not supported by this server; leave it out.", param=field)
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty.", param="prompt")
        if prompt_len > max_prompt:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this server takes at most {max_prompt}.",
                           param="messages" if isinstance(body, ChatBody) else "prompt", code="context_length_exceeded")
        room = context - prompt_len
        if max_tokens is None:
            max_tokens = min(default_max or limits.max_tokens, limits.max_tokens, room)
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens}; this server allows at most {limits.max_tokens}.",
                           param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) and max_tokens={max_tokens} exceed the model's "
                           f"context of {context} tokens; ask for fewer tokens.", param="max_tokens",
                           code="context_length_exceeded")
        if prompt_len + max_tokens > engine.kv_budget:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) and max_tokens={max_tokens} exceed this server's "
                           f"KV cache of {engine.kv_budget} positions; ask for fewer tokens.", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop or any(len(s) > 256 for s in stop):
            raise ApiError(400, f"give at most {limits.max_stop} stop strings of at most 256 characters.",
                           param="stop")
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=body.top_p or 1.0, top_k=max(body.top_k or 0, 0), seed=body.seed, stop=stop)

    @v1.post("/completions")
    async def completions(request: HttpRequest):
        body = await _parse(request, CompletionBody, limits)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request.", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer(_bounded(prompt, max_prompt))["input_ids"]
        else:
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")
            ids = list(prompt)
        params = sampling(body, len(ids), body.max_tokens, 16)  # OpenAI's default for completions
        adapter = await adapter_of(body.model)
        return await _run(request, engine, body, ids, params, adapter, chat=False)

    @v1.post("/chat/completions")
    async def chat(request: HttpRequest):
        body = await _parse(request, ChatBody, limits)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(400, f"{base_name} has no chat template; use /v1/completions.", param="messages")
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        _bounded("".join(m["content"] for m in messages), max_prompt)
        try:  # the prompt tokens training put before an assistant turn (`lorakit train` on chat data)
            ids = chat_prompt_ids(tokenizer, messages, source="the messages")
        except ConfigError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        except Exception as exc:  # the template's own checks (e.g. roles in a required order)
            raise ApiError(400, f"the chat template refused these messages: {exc}", param="messages") from exc
        params = sampling(body, len(ids), body.max_completion_tokens or body.max_tokens, None)
        adapter = await adapter_of(body.model)
        return await _run(request, engine, body, ids, params, adapter, chat=True)

    app.include_router(v1)
    return app


def _bounded(text: str, max_prompt: int) -> str:
    """`text`, unless it is too long to be `max_prompt` tokens (no tokenizer makes tokens of 64 characters)."""
    if len(text) > 64 * max_prompt:
        raise ApiError(400, f"the prompt has {len(text)} characters; this server takes at most {max_prompt} tokens.",
                       param="prompt", code="context_length_exceeded")
    return text


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "message content parts must be {'type': 'text', 'text': ...}.", param="messages")
        parts.append(part["text"])
    return "".join(parts)


def _discoverable(registry: AdapterRegistry) -> list[str]:
    """Adapter folders directly under --adapter-dir (they load on first use)."""
    if registry.root is None:
        return []
    try:
        return sorted(p.name for p in registry.root.iterdir()
                      if (p / "adapter_config.json").is_file() and p.resolve().is_relative_to(registry.root.resolve()))
    except OSError:
        return []


def _invalid(errors: list[dict]) -> ApiError:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)


async def _parse(request: HttpRequest, cls: type[BaseModel], limits: Limits):
    """The JSON body as `cls`, read up to the size limit."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
        raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {limits.max_body_bytes} bytes.")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object.")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc.errors()) from exc


class _Pipe:
    """Events from the engine's thread into this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass


def _engine_error(event: Event) -> ApiError:
    exc = event.error
    if isinstance(exc, AdapterNotFoundError):
        return ApiError(404, str(exc), "not_found_error", "model", "model_not_found")
    if isinstance(exc, (ConfigError, LoraError)):
        return ApiError(400, str(exc), param="model")
    return ApiError(500, f"generation failed ({type(exc).__name__}: {exc})", "internal_error")


async def _run(http: HttpRequest, engine: Engine, body: _Body, ids: list[int], params: SamplingParams,
               adapter: str | None, chat: bool):
    pipe = _Pipe()
    req = Request(ids, params, pipe.emit, adapter=adapter)
    try:
        engine.submit(req)
    except QueueFull as exc:
        raise ApiError(429, f"the server is busy: {exc}", "rate_limit_exceeded", code="rate_limit_exceeded",
                       headers={"Retry-After": "1"}) from exc
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": body.model}

    def usage(ev: Event) -> dict:
        return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
                "total_tokens": ev.prompt_tokens + ev.completion_tokens}

    if not body.stream:  # (None: not streamed)
        parts, event = [], None
        try:
            while event is None or event.finish_reason is None:
                try:
                    event = await asyncio.wait_for(pipe.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        engine.cancel(req)
                        return Response(status_code=499)
                    continue
                parts.append(event.text)
        except BaseException:
            engine.cancel(req)
            raise
        if event.finish_reason == "error":
            raise _engine_error(event)
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": event.finish_reason} if chat else
                  {"index": 0, "text": text, "logprobs": None, "finish_reason": event.finish_reason})
        return {**head, "choices": [choice], "usage": usage(event)}

    include_usage = bool((body.stream_options or {}).get("include_usage"))
    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**chunk_head, 'choices': [choice]})}\n\n"

    async def events():
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await pipe.queue.get()
                if event.finish_reason == "error":
                    err = _engine_error(event)
                    body_ = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
                    yield f"data: {json.dumps(body_)}\n\n"
                    break
                if event.text and event.finish_reason is None:
                    yield chunk(event.text, None)
                if event.finish_reason is not None:
                    if event.text:
                        yield chunk(event.text, None)
                    yield chunk(None, event.finish_reason)
                    if include_usage:
                        yield f"data: {json.dumps({**chunk_head, 'choices': [], 'usage': usage(event)})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            engine.cancel(req)  # a client gone mid-stream frees its row (a no-op once finished)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
