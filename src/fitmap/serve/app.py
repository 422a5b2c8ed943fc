"""The HTTP API, OpenAI's shape: ``/v1/chat/completions`` (SSE streaming or not; text and
``image_url`` parts as data URLs), ``/v1/completions``, ``/v1/models``, ``/health``,
``/metrics`` (Prometheus text). Every limit violated is a 4xx JSON error in OpenAI's
error shape; a request that fails inside a replica is a 500 and the server keeps serving.
"""

import asyncio
import base64
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fitmap.errors import BadInput
from fitmap.serve.engine import END, Engine, QueueFull, Request
from fitmap.serve.requests import ApiError, check_options, number, parse_body, seed, shown

__all__ = ["ApiError", "Limits", "create_app"]


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 16 << 20  # a request body, images included
    image_pixels: int = 4096 * 4096  # per image
    queue: int = 64  # requests waiting or running, all replicas


def create_app(
    engine: Engine,
    model_name: str,
    api_key: str | None = None,
    limits: Limits = Limits(),
    aliases: tuple[str, ...] = (),
):
    """``model_name``: the id ``/v1/models`` lists and every response carries; a request's ``model``
    may name it or one of ``aliases`` (``fitmap serve``: the model as given on its command line)."""
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="fitmap serve", docs_url=None, redoc_url=None, openapi_url=None)
    counters = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        counters["errors"] += 1
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    from starlette.exceptions import HTTPException as RoutingError

    @app.exception_handler(RoutingError)
    async def _routing_error(request, exc: RoutingError):  # unknown path, wrong method: OpenAI's error shape too
        counters["errors"] += 1
        what = {
            404: f"no such endpoint: {request.url.path} (this server has /v1/chat/completions, "
            "/v1/completions, /v1/models, /health, /metrics)",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return JSONResponse(
            ApiError(exc.status_code, what, code="not_found" if exc.status_code == 404 else None).body(),
            status_code=exc.status_code,
        )

    @app.middleware("http")
    async def _guard(request: HttpRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                counters["errors"] += 1
                return JSONResponse(
                    ApiError(
                        401,
                        "missing or wrong API key (Authorization: Bearer ...)",
                        "authentication_error",
                        code="invalid_api_key",
                    ).body(),
                    status_code=401,
                )
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.body_bytes:
            counters["errors"] += 1
            return JSONResponse(
                ApiError(
                    413, f"the request body has {size} bytes, over the server's limit of {limits.body_bytes}"
                ).body(),
                status_code=413,
            )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "replicas": len(engine.workers)}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": int(engine.started), "owned_by": "fitmap"}],
        }

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine, counters), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _json(request, limits)
        messages = _messages(body.get("messages"), engine, limits)
        job = _job(body, engine, messages=messages)
        return await _respond(request, body, job, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = await _json(request, limits)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        job = _job(body, engine, prompt=prompt)
        return await _respond(request, body, job, "text_completion")

    async def _respond(request, body: dict, job: Request, kind: str):
        asked = body.get("model") or model_name
        if asked != model_name and asked not in aliases:
            raise ApiError(
                404,
                f"model {shown(asked)} is not served here; this server serves {model_name!r}",
                code="model_not_found",
                param="model",
            )
        model = model_name  # what the response carries, whichever accepted name was asked for
        job.loop, job.chunks = asyncio.get_running_loop(), asyncio.Queue()
        try:
            engine.submit(job)
        except QueueFull as e:
            raise ApiError(
                429, str(e), "rate_limit_error", headers={"Retry-After": str(engine.retry_after())}
            ) from None
        counters["requests"] += 1
        ident = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.get("stream"):
            return StreamingResponse(
                _stream(request, job, ident, created, model, kind, counters), media_type="text/event-stream"
            )
        pieces = []
        try:
            while True:
                item = await job.chunks.get()
                if item is END:
                    break
                if isinstance(item, BaseException):
                    raise _failed(item)
                pieces.append(item)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        text = "".join(pieces)
        counters["prompt_tokens"] += job.prompt_tokens
        counters["completion_tokens"] += job.completion_tokens
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
        }
        if kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": job.finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}
        return {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice], "usage": usage}

    return app


async def _stream(request, job: Request, ident: str, created: int, model: str, kind: str, counters: dict):
    chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"

    def event(delta: dict | str | None, finish: str | None) -> str:
        if kind == "chat.completion":
            choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        chunk = {"id": ident, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"

    try:
        if kind == "chat.completion":
            yield event({"role": "assistant", "content": ""}, None)
        assert job.chunks is not None  # _respond sets it before it submits the job
        while True:
            try:
                item = await asyncio.wait_for(job.chunks.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                continue
            if item is END:
                break
            if isinstance(item, BaseException):
                err = _failed(item)
                yield f"data: {json.dumps(err.body())}\n\n"
                return
            yield event({"content": item} if kind == "chat.completion" else item, None)
        counters["prompt_tokens"] += job.prompt_tokens
        counters["completion_tokens"] += job.completion_tokens
        yield event(None, job.finish_reason)
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        job.cancelled.set()  # the client went away: the replica stops at its next token
        raise


def _failed(e: BaseException) -> ApiError:
    if isinstance(e, BadInput):
        return ApiError(400, str(e))
    return ApiError(
        500,
        f"the replica failed on this request: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
        "server_error",
    )


async def _json(request, limits: Limits) -> dict:
    raw = await request.body()
    if len(raw) > limits.body_bytes:
        raise ApiError(413, f"the request body has {len(raw)} bytes, over the server's limit of {limits.body_bytes}")
    body = parse_body(raw)
    check_options(body)
    return body


def _job(body: dict, engine: Engine, messages: list[dict] | None = None, prompt: str | None = None) -> Request:
    plan_prompt, plan_new = engine.context
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = (
        plan_new if max_tokens is None else number({"max_tokens": max_tokens}, "max_tokens", plan_new, 1, 10**9, int)
    )
    if max_tokens > plan_new:
        raise ApiError(
            400,
            f"'max_tokens' is {max_tokens}; this server was planned for at most {plan_new} new tokens "
            f"per request (restart fitmap serve with --new {max_tokens} to allow more)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop")
    job = Request(
        messages,
        prompt,
        max_tokens,
        number(body, "temperature", 0.0, 0.0, 2.0),
        number(body, "top_p", 1.0, 0.0, 1.0),
        seed(body),
        tuple(stop),
    )
    tokens = _prompt_tokens(engine, messages, prompt)
    if tokens > plan_prompt:
        raise ApiError(
            400,
            f"the prompt has about {tokens} tokens; this server was planned for {plan_prompt} "
            f"(restart fitmap serve with --prompt {tokens})",
            code="context_length_exceeded",
            param="messages" if messages is not None else "prompt",
        )
    return job


def _prompt_tokens(engine: Engine, messages: list[dict] | None, prompt: str | None) -> int:
    tok = engine.base.tokenizer
    if prompt is not None:
        text = prompt
    else:
        assert messages is not None  # _job is given the messages or the prompt
        text = "\n".join(m["text"] for m in messages)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _messages(raw, engine: Engine, limits: Limits) -> list[dict]:
    """OpenAI messages -> [{"role", "text", "images"}] (images decoded from data URLs)."""
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = [_message(i, m, limits) for i, m in enumerate(raw)]
    if out[-1]["role"] != "user" or not out[-1]["text"].strip():
        raise ApiError(400, "the last message must be a user message with text", param="messages")
    images = [img for m in out for img in m["images"]]
    try:
        engine.check_images(images)
    except BadInput as e:
        raise ApiError(400, str(e), param="messages") from None
    _check_image_count(len(images), engine)
    return out


def _message(i: int, m, limits: Limits) -> dict[str, Any]:
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
        raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}]")
    content = m.get("content")
    texts, images = [], []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                images.append(_image(part.get("image_url"), f"messages[{i}].content[{j}]", limits))
            else:
                raise ApiError(
                    400,
                    f"messages[{i}].content[{j}] must be a text or image_url part",
                    param=f"messages[{i}].content[{j}]",
                )
    else:
        raise ApiError(
            400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content"
        )
    role = "system" if m["role"] == "developer" else m["role"]
    if images and role != "user":
        raise ApiError(400, f"messages[{i}]: only user messages may carry images", param=f"messages[{i}]")
    return {"role": role, "text": "".join(texts), "images": images}


def _check_image_count(count: int, engine: Engine) -> None:
    """At most as many images as the plan holds memory for (``fitmap serve --image``, once per image)."""
    room = len(engine.plan.replicas[0].plan.workload.images)
    if count > room:
        raise ApiError(
            400,
            f"the request carries {count} image(s); this server was planned for {room} per request "
            f"(restart fitmap serve with --image WxH given {count} times to allow {count})",
            param="messages",
        )


def _image(spec, where: str, limits: Limits):
    from PIL import Image

    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise ApiError(
            400,
            f"{where}: images must be data URLs (data:image/png;base64,...); this server fetches "
            "nothing from the network",
            param=where,
        )
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > limits.image_pixels:
            raise ApiError(
                400,
                f"{where}: the image is {w}x{h}, over the server's limit of {limits.image_pixels} pixels",
                param=where,
            )
        return img.convert("RGB")
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(400, f"{where}: not a readable image ({type(e).__name__})", param=where) from None


def _prometheus(engine: Engine, counters: dict) -> str:
    import torch

    lines = [
        "# TYPE fitmap_requests_total counter",
        f"fitmap_requests_total {counters['requests']}",
        "# TYPE fitmap_request_errors_total counter",
        f"fitmap_request_errors_total {counters['errors']}",
        "# TYPE fitmap_prompt_tokens_total counter",
        f"fitmap_prompt_tokens_total {counters['prompt_tokens']}",
        "# TYPE fitmap_completion_tokens_total counter",
        f"fitmap_completion_tokens_total {counters['completion_tokens']}",
        "# TYPE fitmap_queue_length gauge",
        f"fitmap_queue_length {engine.queued}",
        "# TYPE fitmap_rejected_total counter",
        f"fitmap_rejected_total {engine.rejected}",
        "# TYPE fitmap_replica_requests_total counter",
        *(f'fitmap_replica_requests_total{{replica="{w.index}"}} {w.served}' for w in engine.workers),
        "# TYPE fitmap_replica_batches_total counter",
        *(f'fitmap_replica_batches_total{{replica="{w.index}"}} {w.batches}' for w in engine.workers),
        "# TYPE fitmap_replica_loads_total counter",
        *(f'fitmap_replica_loads_total{{replica="{w.index}"}} {w.loads}' for w in engine.workers),
        "# TYPE fitmap_replica_pending gauge",
        *(f'fitmap_replica_pending{{replica="{w.index}"}} {w.pending}' for w in engine.workers),
        "# HELP fitmap_replica_running requests in the replica's running batch",
        "# TYPE fitmap_replica_running gauge",
        *(f'fitmap_replica_running{{replica="{w.index}"}} {w.running}' for w in engine.workers),
        "# HELP fitmap_replica_tokens_in_flight cache tokens the running batch holds or may still generate",
        "# TYPE fitmap_replica_tokens_in_flight gauge",
        *(f'fitmap_replica_tokens_in_flight{{replica="{w.index}"}} {w.in_flight}' for w in engine.workers),
        "# HELP fitmap_replica_tokens_budget cache tokens its plan holds: sequences x (prompt + images + new)",
        "# TYPE fitmap_replica_tokens_budget gauge",
        *(f'fitmap_replica_tokens_budget{{replica="{w.index}"}} {w.budget}' for w in engine.workers),
    ]
    if torch.cuda.is_available():
        lines.append("# TYPE fitmap_gpu_memory_allocated_bytes gauge")
        lines += [
            f'fitmap_gpu_memory_allocated_bytes{{gpu="{i}"}} {torch.cuda.memory_allocated(i)}'
            for i in range(torch.cuda.device_count())
        ]
    return "\n".join(lines) + "\n"
