"""The HTTP side of `diffgemma serve`: Starlette routes that parse a request, queue it as a Job and
relay the engine's events as one JSON answer or as SSE chunks (engine/server.py runs them).

Each request's events come from the engine thread through an asyncio queue (_Channel); committed
canvases become text through TextStream, which holds back what could still turn into a stop string.
A streaming client that goes away is seen by Starlette's disconnect listener, one that waits for a
whole answer by our own; either way its job is cancelled and its slot freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .openai_api import (
    APIError,
    GenParams,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    new_id,
    parse_request,
    usage,
)
from .scheduler import Accepted, CanvasDone, Draft, Failed, Finished, Job, QueueFull, ShuttingDown

if TYPE_CHECKING:
    from .server import Service

log = logging.getLogger("diffgemma.serve")

__all__ = ["TextStream", "create_app"]


class TextStream:
    """Committed canvases -> text: each call returns the new text, holding back what could still
    become a stop string (or a character split between canvases); `stopped` once a stop string
    appeared, the text cut before it."""

    def __init__(self, tok, stops: list[str]):
        self.tok, self.stops = tok, stops
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def text(self) -> str:
        text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def feed(self, tokens: list[int], final: bool = False) -> str:
        self.ids.extend(tokens)
        text = self.text()
        if not (final or self.stopped):
            text = text[:max(len(text) - self.hold, 0)].rstrip("\ufffd")
        if not text.startswith(self.sent):
            return ""  # the decoder changed earlier text (a multi-token character completed): keep what was sent
        delta, self.sent = text[len(self.sent):], text
        return delta

    def completion_tokens(self) -> int:
        eos = set(self.tok.eos_ids)
        return next((n for n, t in enumerate(self.ids) if t in eos), len(self.ids))


class _Channel:
    """Events from the engine thread into this request's asyncio queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def get(self) -> Any:
        return await self.queue.get()


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _App:
    def __init__(self, service: Service):
        self.s = service

    def authorize(self, request: Request) -> None:
        key = self.s.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        sch = self.s.scheduler
        return JSONResponse({"status": "draining" if sch.draining else "ok", "model": self.s.model_id,
                             "running": sch.busy, "queued": sch.queued, "max_batch": sch.max_batch,
                             "max_queue": sch.max_queue, "ctx": self.s.ctx})

    async def models(self, request: Request) -> Response:
        self.authorize(request)
        created = int(self.s.lm.path.stat().st_mtime)
        return JSONResponse({"object": "list", "data": [{"id": self.s.model_id, "object": "model", "created": created,
                                                         "owned_by": "diffgemma"}]})

    async def chat(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def generate(self, request: Request, kind: str) -> Response:
        self.authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        p = parse_request(body, kind)
        chan = _Channel()
        job = Job([], 0, self.s.sampler(p), p.seed, drafts=p.draft, on_event=chan.put, prepare=self.s.prepare(p))
        try:
            self.s.scheduler.submit(job)
        except QueueFull as e:
            raise APIError(429, f"{e}; retry later", code="queue_full") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), code="shutting_down") from None
        try:
            first = await chan.get()  # the prompt was tokenized and fits, or why not
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(first, Failed):
            raise APIError(first.status, first.message, code=first.code)
        assert isinstance(first, Accepted)
        rid = new_id(kind)
        if p.stream:
            return StreamingResponse(self.stream(job, chan, p, first.prompt_tokens, rid),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.complete(request, job, chan, p, first.prompt_tokens, rid)

    async def complete(self, request: Request, job: Job, chan: _Channel, p: GenParams, n_prompt: int,
                       rid: str) -> Response:
        text = TextStream(self.s.tok, p.stop)
        steps: list[int] = []

        async def collect() -> str:
            while True:
                ev = await chan.get()
                if isinstance(ev, CanvasDone):
                    steps.append(ev.steps)
                    text.feed(ev.tokens)
                    if text.stopped:
                        job.cancel()
                        return "stop"
                elif isinstance(ev, Finished):
                    return "stop" if ev.finished else "length"
                elif isinstance(ev, Failed):
                    raise APIError(ev.status, ev.message, code="generation_failed")

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not result.done():  # the client went away (or this handler was cancelled)
                job.cancel()
                result.cancel()
            gone.cancel()
        if not result.done() or result.cancelled():
            return Response(status_code=499)
        finish = result.result()
        out, use = text.text(), usage(n_prompt, text.completion_tokens())
        build = chat_response if p.kind == "chat" else completion_response
        # extension: the generated ids (padded after the end, as run --json's token_ids) and the steps
        # each canvas took, so a client can check an answer against `diffgemma run --seed`
        extra = {"diffgemma": {"token_ids": text.ids, "steps_per_canvas": steps}}
        return JSONResponse(build(rid, self.s.model_id, out, finish, use) | extra)

    async def stream(self, job: Job, chan: _Channel, p: GenParams, n_prompt: int, rid: str) -> AsyncIterator[bytes]:
        model, tok = self.s.model_id, self.s.tok
        text = TextStream(tok, p.stop)

        def chunk(content: str | None, finish: str | None = None, use: dict | None = None, **extra: Any) -> bytes:
            if p.kind == "chat":
                delta = None if content is None else ({"content": content} if content or finish is None else {})
                return _sse(chat_chunk(rid, model, delta, finish, use, **extra))
            return _sse(completion_chunk(rid, model, content, finish, use, **extra))

        try:
            if p.kind == "chat":
                yield _sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}))
            while True:
                ev = await chan.get()
                if isinstance(ev, Draft):
                    draft = {"canvas": ev.canvas, "step": ev.step, "draft": tok.decode(ev.tokens)}
                    yield chunk("", diffgemma=draft)
                    continue
                if isinstance(ev, Failed):
                    yield _sse(error_body(APIError(ev.status, ev.message, code="generation_failed")))
                    return
                final = isinstance(ev, Finished)
                delta = text.feed(ev.tokens if isinstance(ev, CanvasDone) else [], final=final)
                if delta:
                    yield chunk(delta)
                if text.stopped or final:
                    job.cancel()  # a stop string: free the slot now (no-op when the job is finished)
                    finish = "stop" if text.stopped or ev.finished else "length"
                    yield chunk("", finish)
                    if p.include_usage:
                        yield chunk(None, use=usage(n_prompt, text.completion_tokens()))
                    yield b"data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # client gone mid-stream: the engine drops the job at its next step


def create_app(service: Service) -> Starlette:
    app = _App(service)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return JSONResponse(error_body(exc), status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(error_body(APIError(exc.status_code, exc.detail or "error")), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(APIError(500, f"internal error: {type(exc).__name__}: {exc}")), status_code=500)

    routes = [Route("/health", app.health, methods=["GET"]), Route("/v1/models", app.models, methods=["GET"]),
              Route("/v1/chat/completions", app.chat, methods=["POST"]),
              Route("/v1/completions", app.completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})
