"""The HTTP side: an OpenAI-compatible FastAPI app over one ``Engine``.

Every request is parsed and checked here (a bad one gets an OpenAI-style error body and
changes nothing), queued as a ``Job``, and answered from the job's events: all at once, or as
server-sent events in OpenAI's chunk format, a delta as soon as tokens are final, then the
finish reason, the usage (with ``include_usage``) and ``[DONE]``. With ``show_steps`` the stream
also carries ``event: twotower.step`` and ``event: twotower.commit`` events for the live view;
plain clients never ask for them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UsageError
from ..generate.decode import check_request
from ..generate.prompts import encode_messages, encode_prompt
from ..generate.stopping import LENGTH, STOP, TextStream, visible_text
from .engine import Engine, Job, QueueFull
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, Common, CompletionRequest, settings_for

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413)
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


ERROR_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               499: "cancelled", 500: "server_error", 503: "server_error", 504: "timeout"}


def _error(status: int, message: str, **kw) -> APIError:
    return APIError(status, message, kw.pop("kind", ERROR_KINDS.get(status, "invalid_request_error")), **kw)


def create_app(engine: Engine, model_name: str, recommended: dict, *, api_key: str | None = None,
               timeout_s: float | None = None, default_max_tokens: int = 256,
               metrics: ServerMetrics | None = None, description: str = "") -> FastAPI:
    metrics = metrics or engine.metrics or ServerMetrics()
    engine.metrics = metrics
    tokenizer = engine.tokenizer
    texts = TokenText(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # after uvicorn drained the open requests

    app = FastAPI(title="twotower", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse(_error(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        return JSONResponse(_error(500, "internal server error").body(), status_code=500)

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise _error(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def parse(request: Request, schema: type[Common]) -> Common:
        authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _error(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise _error(400, "the body must be a JSON object")
        try:
            parsed = schema.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise _error(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None
        if parsed.model != model_name:
            raise _error(404, f"the model {parsed.model!r} does not exist (this server has {model_name!r})",
                         param="model", code="model_not_found")
        return parsed

    def job_for(parsed: Common, prompt_ids: list[int], loop) -> Job:
        settings = settings_for(parsed, recommended, default_max_tokens)
        top = parsed.top_logprobs_count()
        check_request(engine.model, prompt_ids, settings, logprobs=top is not None)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return Job(prompt_ids, settings, loop, show_steps=parsed.show_steps, logprobs=top, deadline=deadline)

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except QueueFull as e:
            raise _error(429, str(e), headers={"Retry-After": "1"}) from None

    async def answer(request: Request, parsed: Common, prompt_ids: list[int], chat: bool):
        try:
            job = job_for(parsed, prompt_ids, asyncio.get_running_loop())
        except UsageError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            param = "logprobs" if "logprobs" in str(e) else None
            raise _error(400, str(e), code=code, param=param) from None
        submit(job)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            return StreamingResponse(stream(job, ident, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole(request, job, ident, chat)

    def usage(job: Job, tokens: list[int], nfe: int) -> dict:
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(tokens),
                "total_tokens": len(job.prompt_ids) + len(tokens), "nfe": nfe,
                "tokens_per_nfe": round(len(tokens) / nfe, 4) if nfe else 0.0}

    def finished(job: Job, end: dict) -> tuple[str, dict]:
        """The OpenAI finish reason and the usage of an ended job; records its metrics."""
        tokens = end["tokens"]
        metrics.generated_tokens.inc(len(tokens))
        metrics.nfe.inc(end["nfe"])
        if end["nfe"]:
            metrics.tokens_per_nfe.observe(len(tokens) / end["nfe"])
        if end["reason"] not in (STOP, LENGTH):
            raise _error(504, "the request timed out", code="timeout")
        return end["reason"], usage(job, tokens, end["nfe"])

    class Clock:
        """Time to first token and time per token of one response."""

        def __init__(self, job: Job) -> None:
            self.start, self.last = job.created, None

        def tokens(self, n: int) -> None:
            now = time.monotonic()
            if self.last is None:
                metrics.ttft.observe(now - self.start)
            else:  # a run of n tokens arriving together: n tokens of 1/n of the wait each
                for _ in range(n):
                    metrics.token_latency.observe((now - self.last) / n)
            self.last = now

    def logprobs_of(job: Job, scores: list | None, chat: bool, offset: int = 0) -> tuple[dict | None, int]:
        """A choice's ``logprobs`` (None unless the request asked) and the text offset after it."""
        if job.logprobs is None:
            return None, offset
        if chat:
            return chat_logprobs(scores or [], texts), offset
        return completion_logprobs(scores or [], texts, offset)

    async def whole(request: Request, job: Job, ident: str, chat: bool) -> JSONResponse:
        clock = Clock(job)
        scores: list = []
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse(_error(499, "the client closed the request").body(), status_code=499)
                    continue
                if kind == "tokens":
                    clock.tokens(len(payload[0]))
                    scores += payload[1] or []
                elif kind == "error":
                    status, message = payload
                    raise _error(status, message)
                elif kind == "end":
                    break
        finally:
            if not job.done:
                job.cancel()
        reason, use = finished(job, payload)
        text = visible_text(tokenizer, payload["tokens"], job.settings.stop_strings)
        body = {"id": ident, "created": int(time.time()), "model": model_name, "usage": use}
        logprobs = logprobs_of(job, scores, chat)[0]
        if chat:
            body |= {"object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": reason}]}
        else:
            body |= {"object": "text_completion", "choices": [{
                "index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
        return JSONResponse(body)

    async def stream(job: Job, ident: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model_name}

        def chunk(text: str | None, reason: str | None = None, first: bool = False, logprobs: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
            return "data: " + json.dumps(head | {"choices": [choice]}) + "\n\n"

        def event(name: str, data: dict) -> str:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n"

        text = TextStream(tokenizer, job.settings.stop_strings)
        clock = Clock(job)
        offset = 0  # completions' text_offset
        try:
            if chat:
                yield chunk(None, first=True)
            while True:
                kind, payload = await job.events.get()
                if kind == "tokens":
                    tokens, scores = payload
                    clock.tokens(len(tokens))
                    new = "".join(text.push(tok) for tok in tokens)
                    # a token's logprobs travel with the chunk of its arrival, also when its text is
                    # held back (an incomplete character, a possible stop string's start)
                    logprobs, offset = logprobs_of(job, scores, chat, offset)
                    if new or any(texts.shown(sc) for sc in scores or []):
                        yield chunk(new, logprobs=logprobs)
                elif kind == "step":
                    yield event("twotower.step", payload | {"pieces": [
                        None if t < 0 else tokenizer.decode([t], skip_special_tokens=True) for t in payload["tokens"]]})
                elif kind == "commit":
                    piece = tokenizer.decode([payload["token"]], skip_special_tokens=True)
                    yield event("twotower.commit", payload | {"piece": piece, "ar": payload["step"] < 0})
                elif kind == "error":
                    status, message = payload
                    yield "data: " + json.dumps(_error(status, message).body()) + "\n\n"
                    break
                elif kind == "end":
                    try:
                        reason, use = finished(job, payload)
                    except APIError as e:
                        yield "data: " + json.dumps(e.body()) + "\n\n"
                        break
                    rest = text.finish()
                    if rest:
                        yield chunk(rest)
                    yield chunk(None, reason)
                    if include_usage:
                        yield "data: " + json.dumps(head | {"choices": [], "usage": use}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client left mid-stream (the generator is closed): free its row
            if not job.done:
                job.cancel()

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = await parse(request, CompletionRequest)
        try:
            prompt = parsed.prompt_value()
            if isinstance(prompt, str):
                ids = encode_prompt(tokenizer, prompt, chat=False)
            else:
                ids = list(prompt)
        except UsageError as e:
            raise _error(400, str(e), param="prompt") from None
        return await answer(request, parsed, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = await parse(request, ChatCompletionRequest)
        try:
            ids = encode_messages(tokenizer, parsed.conversation())
        except UsageError as e:
            raise _error(400, str(e), param="messages") from None
        return await answer(request, parsed, ids, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "twotower", "description": description}]}

    @app.get("/health")
    async def health():
        alive = engine.thread.is_alive()
        body = {"status": "ok" if alive else "dead", "model": model_name, "ready": engine.ready.is_set(),
                "queued": engine.queue_depth, "running": len(engine.running)}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        html = resources.files("twotower.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", model_name))

    return app
