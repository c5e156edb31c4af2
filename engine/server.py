"""`diffgemma serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Starlette routes (engine/server_app.py) on uvicorn, SSE for streaming. The model is loaded once;
every request becomes a `Job` for engine/scheduler.py, whose engine thread tokenizes it and denoises
the canvases of all running requests in one batched pass per step. The asyncio side only parses,
queues and relays events.

Endpoints: POST /v1/chat/completions, POST /v1/completions (shapes and field mapping in
engine/openai_api.py), GET /v1/models, GET /health. Limits: --max-queue requests may wait beyond the
--max-batch running ones (more: 429), a prompt plus its canvases must fit --ctx (else 400),
--api-key makes /v1/* answer 401 without `Authorization: Bearer KEY`. A client that goes away
cancels its job, which frees its slot at the next step. SIGTERM (or Ctrl-C): stop admitting
(waiting requests get 503), let the running ones finish, exit 0.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn

from gguf_tools.units import SizeError, parse_size

from . import plan_cli
from .experts import attach_plan
from .generate import _validate
from .openai_api import APIError, GenParams
from .placement import PlacementError
from .run import EngineError, LoadedModel, RunOptions, is_builtin, load, resolve_device, sampler_kwargs, use_backend
from .scheduler import Scheduler
from .server_app import create_app

log = logging.getLogger("diffgemma.serve")

DEFAULT_CTX = 8192  # per request, when --ctx is not given (capped at the model's context length)

__all__ = ["ServeOptions", "Service", "create_app", "open_service", "serve"]


@dataclass
class ServeOptions:
    model: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    max_batch: int = 8
    max_queue: int = 64
    ctx: int | None = None  # per request: prompt + canvases (default: min(model's, DEFAULT_CTX))
    api_key: str | None = None
    device: str = "auto"
    threads: int | None = None
    backend: str = "auto"
    vram: str | int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    override_tensor: tuple[str, ...] = ()

    def check(self) -> ServeOptions:
        for flag, v, low in (("--port", self.port, 0), ("--max-batch", self.max_batch, 1),
                             ("--max-queue", self.max_queue, 0), ("--ctx", self.ctx, 1), ("--threads", self.threads, 1),
                             ("--n-cpu-moe", self.n_cpu_moe, 0)):
            if v is not None and v < low:
                raise EngineError(f"{flag} {v}: must be at least {low}")
        if self.port > 65535:
            raise EngineError(f"--port {self.port}: must be at most 65535")
        if self.api_key is not None and not self.api_key.strip():
            raise EngineError("--api-key is empty")
        resolve_device(self.device)
        if isinstance(self.vram, str):
            try:
                self.vram = parse_size(self.vram, "--vram")
            except SizeError as e:
                raise EngineError(str(e)) from None
        return self


class Service:
    """The loaded model and its scheduler, and what a request needs from them."""

    def __init__(self, lm: LoadedModel, scheduler: Scheduler, ctx: int, api_key: str | None):
        self.lm, self.scheduler, self.ctx, self.api_key = lm, scheduler, ctx, api_key
        self.model_id = lm.path.stem
        self.tok = lm.tokenizer
        self.spec = lm.model.spec
        _compile_template_once(self.tok)

    def prompt_ids(self, p: GenParams) -> list[int]:
        """The prefilled ids: the file's chat template over the messages, or <bos> + the text for
        /v1/completions. Called on the engine thread, between two passes (Job.prepare)."""
        assert self.tok is not None
        if p.kind != "chat":
            return self.tok.raw(p.prompt)
        if p.think and is_builtin(self.lm.file):
            raise APIError(400, "think: the built-in model was not trained with a thinking channel", "think")
        return self.tok.apply_chat(p.messages, think=p.think)

    def prepare(self, p: GenParams) -> Callable[[], tuple[list[int], int]]:
        def ids_and_budget() -> tuple[list[int], int]:
            ids = self.prompt_ids(p)
            return ids, self.budget(len(ids), p.max_tokens)

        return ids_and_budget

    def budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """max_new_tokens for a prompt of n_prompt ids: every canvas must fit the context."""
        c = self.spec.canvas_length
        room = (self.ctx - n_prompt) // c * c
        if room < 1:
            raise APIError(400, f"the prompt ({n_prompt} tokens) leaves no room for a {c}-token canvas in the "
                                f"context of {self.ctx} tokens (--ctx)", "messages", "context_length_exceeded")
        if max_tokens is None:
            return min(self.spec.sampler.max_new_tokens, room)
        if max_tokens > room:
            need = -(-max_tokens // c) * c
            raise APIError(400, f"max_tokens {max_tokens}: the prompt ({n_prompt} tokens) plus {need} canvas tokens "
                                f"exceed the context of {self.ctx} tokens (--ctx); at most {room} fit",
                           "max_tokens", "context_length_exceeded")
        return max_tokens

    def sampler(self, p: GenParams) -> dict[str, Any]:
        opts = RunOptions(steps=p.steps, entropy_bound=p.entropy_bound, t_min=p.t_min, t_max=p.t_max)
        kw = sampler_kwargs(self.spec, opts)
        if p.temperature is not None:
            kw["t_min"], kw["t_max"] = kw["t_min"] * p.temperature, kw["t_max"] * p.temperature
        try:
            _validate(1, kw["steps"], kw["entropy_bound"], kw["t_min"], kw["t_max"], kw["stability_threshold"],
                      kw["confidence_threshold"])
        except ValueError as e:  # e.g. a t_min above the file's t_max
            raise APIError(400, f"sampler settings: {e}") from None
        return kw


def _compile_template_once(tok) -> None:
    """Keep the file's compiled chat template: the tokenizer compiles it for every prompt, under the
    sandbox's tracing limits (about 40 ms each time here, against 0.1 ms to render it), which a
    server pays per request on its engine thread. The first compile happens here, under the same
    limits; later renders of the same source reuse it (still rendered under the limits)."""
    if tok is None or not getattr(tok, "chat_template", None):
        return
    tok.render_chat([{"role": "user", "content": ""}])  # builds the sandboxed environment
    env = getattr(tok, "_env", None)
    if env is not None and not hasattr(env.from_string, "cache_info"):
        env.from_string = functools.lru_cache(maxsize=4)(env.from_string)


def open_service(opts: ServeOptions, on_notice: Callable[[str], None] | None = None) -> Service:
    """Load the model once, give it the backend and the placement for --max-batch sequences of
    --ctx tokens (checked against the available memory first), and make its scheduler."""
    opts.check()
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    lm = load(opts.model, device)
    m, spec = lm.model, lm.model.spec
    ctx = opts.ctx if opts.ctx is not None else min(spec.context_length, DEFAULT_CTX)
    if ctx > spec.context_length:
        raise EngineError(f"--ctx {ctx} exceeds the context length {spec.context_length}")
    if ctx <= spec.canvas_length:
        raise EngineError(f"--ctx {ctx}: must be above the canvas length {spec.canvas_length} (a prompt and a canvas)")
    if opts.n_cpu_moe > spec.block_count:
        raise EngineError(f"--n-cpu-moe {opts.n_cpu_moe}: {lm.path.name} has {spec.block_count} layers")
    use_backend(m, opts.backend, device, on_notice)
    try:
        one = plan_cli.runtime_need(spec, ctx, spec.canvas_length, m.dtype)
        need = {k: v * opts.max_batch for k, v in one.items()}
        plan_cli.check_memory(need, *plan_cli.device_available(device, opts.vram), ctx * opts.max_batch,
                              "lower --ctx or --max-batch")
        plan = plan_cli.plan_for_run(lm.file, spec, device, m.dtype, ctx=ctx * opts.max_batch, vram=opts.vram,
                                     cpu_moe=opts.cpu_moe, n_cpu_moe=opts.n_cpu_moe,
                                     override_tensor=opts.override_tensor, backend=m.ops.name).require()
    except PlacementError as e:
        raise EngineError(str(e)) from None
    m.prefill_chunk = plan.prefill_chunk or m.prefill_chunk  # as run: the same chunks, the same numbers
    attach_plan(m, plan)
    return Service(lm, Scheduler(m, opts.max_batch, opts.max_queue), ctx, opts.api_key)


class _Server(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the scheduler first and the process exiting 0 after
    the graceful shutdown (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.scheduler.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as e:
        raise EngineError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def serve(opts: ServeOptions, on_notice: Callable[[str], None] | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the server until SIGTERM/SIGINT; `on_ready` gets the URL once it listens (the real port
    when --port 0 asked for any free one)."""
    opts.check()
    sock = _listen(opts.host, opts.port)  # a port in use is said before the model is loaded
    try:
        service = open_service(opts, on_notice)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=None)
    server = _Server(config, service.scheduler)
    service.scheduler.start()
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}")
    try:
        server.run(sockets=[sock])
    finally:
        service.scheduler.close(timeout=30)
        sock.close()
