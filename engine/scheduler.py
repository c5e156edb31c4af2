"""Continuous batching: many generation requests denoised together, one batched pass per step.

Each request (`Job`) keeps everything `engine.generate.generate` keeps for one sequence -- its KV
cache, its torch.Generator seeded with its own seed, its canvas, self-conditioning input, stopping
state and temperature schedule -- in a `_Sequence`, which replays generate()'s loop one step at a
time: the same sampler calls on the same values in the same order, so the RNG is consumed exactly
as in `diffgemma run` and a request's tokens equal run's for its seed whatever else is in the batch
(engine/batch.py makes the model side batch-independent).

The engine thread loops: admit waiting jobs up to `max_batch` (between steps, so a new request
starts at the next pass), build one segment per active sequence -- the next chunk of its prompt
(prefill interleaved with the other sequences' denoising), its committed canvas to re-encode, or
its canvas at the current step -- run them in one `BatchedPass`, advance every sequence, and retire
the finished and the cancelled ones. Events go to each job's callback on the engine thread.

Faults stay with their request: when a batched pass raises, the caches it touched are put back
and each segment is run alone, so only the segments that fail on their own fail their jobs; an
exception in one sequence's sampler step fails only that job.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from engine import sampler as S

from .batch import BatchedPass, Segment, SegmentOutput
from .model import DiffusionGemmaModel

log = logging.getLogger("diffgemma.serve")

__all__ = ["Accepted", "CanvasDone", "Draft", "Failed", "Finished", "Job", "QueueFull", "Scheduler", "ShuttingDown"]


class QueueFull(RuntimeError):
    """The waiting queue holds --max-queue jobs already."""


class ShuttingDown(RuntimeError):
    """The scheduler no longer admits jobs (SIGTERM)."""


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class CanvasDone:
    index: int
    tokens: list[int]  # the committed canvas, trimmed to what is left of max_new_tokens
    steps: int


@dataclass(frozen=True)
class Draft:
    canvas: int
    step: int
    tokens: list[int]  # argmax of the canvas at this step


@dataclass(frozen=True)
class Finished:
    tokens: list[int]
    steps_per_canvas: list[int]
    finished: bool  # an end-of-sequence id was generated


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500
    code: str | None = None


Event = Accepted | CanvasDone | Draft | Finished | Failed


@dataclass
class Job:
    """One generation request: prompt ids, budget, seed and generate()'s sampler keywords
    (steps, entropy_bound, t_min, t_max, stability_threshold, confidence_threshold, eos_ids, pad_id).

    With `prepare`, the ids and the budget are made on the engine thread when the job arrives
    (between two passes: a chat template renders under limits that must not overlap a pass, see
    engine.template_guard), and an Accepted event (or Failed, when prepare raises) comes first."""

    ids: list[int]
    max_new_tokens: int
    sampler: dict[str, Any]
    seed: int = 0
    drafts: bool = False  # send a Draft event per step
    on_event: Callable[[Event], None] | None = None
    prepare: Callable[[], tuple[list[int], int]] | None = None  # () -> (ids, max_new_tokens)
    cancelled: bool = False  # set by the caller (client gone); the slot is freed at the next step
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    """generate() for one job, one pass at a time: `segment()` says what the next pass must do for
    it, `advance(out)` applies the pass's result and returns the events it caused."""

    def __init__(self, job: Job, model: DiffusionGemmaModel):
        kw = job.sampler
        self.job, self.m = job, model
        self.cache = model.new_cache()
        self.gen = torch.Generator(device=model.device).manual_seed(job.seed)
        self.temps = S.temperature_schedule(kw["steps"], kw["t_min"], kw["t_max"])
        self.stopper = S.StoppingState(kw["stability_threshold"], kw["confidence_threshold"], max_steps=kw["steps"])
        self.entropy_bound = kw["entropy_bound"]
        self.eos_ids, self.pad_id = tuple(kw["eos_ids"]), kw["pad_id"]
        ids = torch.tensor(job.ids, dtype=torch.long)
        chunk = model.prefill_chunk  # the chunks DiffusionGemmaModel.encode cuts the prompt into
        self.pending: list[torch.Tensor] = [ids[s:s + chunk] for s in range(0, ids.numel(), chunk)]
        self.n_canvases = math.ceil(job.max_new_tokens / model.canvas_length)
        self.n_left = job.max_new_tokens
        self.canvas_index = 0
        self.canvas: torch.Tensor | None = None
        self.soft: torch.Tensor | None = None
        self.step = 0
        self.outputs: list[torch.Tensor] = []
        self.steps_per_canvas: list[int] = []
        self.done = False

    def segment(self) -> Segment:
        if self.pending:
            return Segment(self.cache, self.pending[0], encoder=True)
        if self.canvas is None:  # a new canvas starts from uniform noise (generate()'s draw order)
            self.canvas = S.random_canvas(self.m.canvas_length, self.m.vocab_size, self.gen, device=self.m.device)
            self.soft, self.step = None, 0
            self.stopper.reset()
        return Segment(self.cache, self.canvas, soft=self.soft, temperature=self.temps[self.step])

    def advance(self, out: SegmentOutput | None) -> list[Event]:
        if self.pending:
            self.pending.pop(0)
            return []
        assert out is not None and self.canvas is not None
        m, vocab = self.m, self.m.vocab_size
        z = S.scale_logits(out.logits, self.temps[self.step])
        sampled = S.sample(z, self.gen)
        argmax = z.argmax(dim=-1)
        h = S.entropy(z)
        accepted = S.entropy_bound_mask(h, self.entropy_bound)
        self.canvas = S.renoise(self.canvas, accepted, sampled, vocab, self.gen)
        stop = self.stopper.update(argmax, h)
        self.step += 1
        # ModelRunner hands the soft embedding of exactly these scaled logits on when the loop feeds
        # them back unchanged (a float32 model); otherwise it recomputes it from their cast copy
        self.soft = out.soft if z.dtype == m.dtype else m.soft_embedding(z.to(m.dtype))
        events: list[Event] = []
        if self.job.drafts:
            events.append(Draft(self.canvas_index, self.step, argmax.tolist()))
        if not stop:
            return events
        self.steps_per_canvas.append(self.stopper.steps)
        committed, eos_seen = S.commit(argmax, self.eos_ids, self.pad_id)
        kept = committed[:self.n_left]
        self.n_left -= kept.numel()
        self.outputs.append(kept)
        events.append(CanvasDone(self.canvas_index, kept.tolist(), self.stopper.steps))
        self.canvas_index += 1
        self.canvas = None
        finished = False
        if eos_seen:
            eos = torch.as_tensor(list(self.eos_ids), dtype=kept.dtype, device=kept.device)
            finished = bool(torch.isin(kept, eos).any())
        if eos_seen or self.canvas_index >= self.n_canvases:
            self.done = True
            events.append(Finished(torch.cat(self.outputs).tolist(), list(self.steps_per_canvas), finished))
        else:
            self.pending.append(committed)  # the committed canvas becomes context
        return events


class Scheduler:
    """Owns the model and the engine thread. `submit` (any thread) queues a job; events arrive on
    the job's callback from the engine thread. `drain()` stops admitting (waiting jobs fail with 503,
    running ones finish); `close()` ends the thread once nothing runs."""

    def __init__(self, model: DiffusionGemmaModel, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be at least 1 and max_queue at least 0")
        self.m, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.batched = BatchedPass(model)
        self.arrivals: deque[Job] = deque()  # submitted, not prepared yet
        self.waiting: deque[Job] = deque()  # prepared, waiting for a slot
        self.active: list[_Sequence] = []
        self.cv = threading.Condition()
        self.draining = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()
        self.stats = {"passes": 0, "segments": 0, "completed": 0, "failed": 0, "cancelled": 0}

    # ---- any thread -------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._loop, name="diffgemma-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.draining or self._closed:
                raise ShuttingDown("the server is shutting down")
            free_slots = self.max_batch - len(self.active)
            if len(self.waiting) + len(self.arrivals) >= self.max_queue + max(free_slots, 0):
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self.arrivals.append(job)
            self.cv.notify()

    def drain(self) -> None:
        """Stop admitting; safe to call from a signal handler (no lock: the engine thread polls)."""
        self.draining = True

    def close(self, timeout: float | None = None) -> None:
        self.draining = True
        self._closed = True
        with self.cv:
            self.cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy(self) -> int:
        return len(self.active)

    @property
    def queued(self) -> int:
        return len(self.waiting) + len(self.arrivals)

    # ---- the engine thread ------------------------------------------------------------------
    def _emit(self, job: Job, event: Event) -> None:
        if job.on_event is None:
            return
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - a receiver that went away must not stop the engine
            log.exception("event delivery failed")

    def _prepare(self, job: Job) -> bool:
        if job.prepare is not None:
            try:
                job.ids, job.max_new_tokens = job.prepare()
            except Exception as e:  # noqa: BLE001 - a bad request (status 400 when it says so)
                self._emit(job, Failed(str(getattr(e, "message", e)), int(getattr(e, "status", 500)),
                                       getattr(e, "code", None)))
                return False
        self._emit(job, Accepted(len(job.ids), job.max_new_tokens))
        return True

    def _admit(self) -> bool:
        """Prepare new arrivals (outside the lock: a template renders there) and move waiting jobs
        into free slots; False when there is nothing to do and the thread should end."""
        while True:
            with self.cv:
                arrivals = list(self.arrivals)
                self.arrivals.clear()
            for job in arrivals:
                if self.draining:
                    self._emit(job, Failed("the server is shutting down", 503))
                elif not job.cancelled and self._prepare(job):
                    with self.cv:
                        self.waiting.append(job)
            with self.cv:
                if self.arrivals:
                    continue
                while self.waiting and (self.draining or self.waiting[0].cancelled):
                    job = self.waiting.popleft()
                    if job.cancelled:
                        self.stats["cancelled"] += 1
                    else:
                        self._emit(job, Failed("the server is shutting down", 503))
                while self.waiting and len(self.active) < self.max_batch:
                    job = self.waiting.popleft()
                    try:
                        self.active.append(_Sequence(job, self.m))
                    except Exception as e:  # noqa: BLE001
                        self._fail(job, e)
                if self.active:
                    return True
                if self._closed:
                    return False
                self.cv.wait(0.2)  # also wakes a drain() set from a signal handler

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)  # the creating thread's setting, whatever the OpenMP runtime does
        while self._admit():
            for seq in [s for s in self.active if s.job.cancelled]:
                self.active.remove(seq)
                self.stats["cancelled"] += 1
            if not self.active:
                continue
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug in the loop itself: fail what runs, keep serving
                log.exception("engine step failed")
                for seq in list(self.active):
                    self._retire(seq, e)

    def _step(self) -> None:
        seqs = list(self.active)
        ready: list[_Sequence] = []
        segments: list[Segment] = []
        for seq in seqs:
            try:
                segments.append(seq.segment())
                ready.append(seq)
            except Exception as e:  # noqa: BLE001
                self._retire(seq, e)
        outs = self._run(ready, segments)
        self.stats["passes"] += 1
        self.stats["segments"] += len(segments)
        for seq, out in zip(ready, outs):
            if isinstance(out, BaseException):
                self._retire(seq, out)
                continue
            try:
                events = seq.advance(out)
            except Exception as e:  # noqa: BLE001
                self._retire(seq, e)
                continue
            for ev in events:
                self._emit(seq.job, ev)
            if seq.done:
                self.active.remove(seq)
                self.stats["completed"] += 1

    def _run(self, seqs: list[_Sequence], segments: list[Segment]) -> list[SegmentOutput | None | BaseException]:
        if not segments:
            return []
        saved = [_snapshot(s.cache) for s in segments]
        try:
            return list(self.batched.run(segments))
        except Exception:  # noqa: BLE001 - find the segment(s) that fail on their own
            log.exception("batched pass failed; retrying its %d segments one by one", len(segments))
            for s, snap in zip(segments, saved):
                _restore(s.cache, snap)
        outs: list[SegmentOutput | None | BaseException] = []
        for s in segments:
            try:
                outs.append(self.batched.run([s])[0])
            except Exception as e:  # noqa: BLE001
                _restore(s.cache, saved[segments.index(s)])
                outs.append(e)
        return outs

    def _retire(self, seq: _Sequence, error: BaseException) -> None:
        if seq in self.active:
            self.active.remove(seq)
        self._fail(seq.job, error)

    def _fail(self, job: Job, error: BaseException) -> None:
        log.error("request failed: %s: %s", type(error).__name__, error)
        self.stats["failed"] += 1
        self._emit(job, Failed(f"generation failed: {type(error).__name__}: {error}"))


def _snapshot(cache) -> tuple[list, list, int]:
    return list(cache.keys), list(cache.values), cache.length


def _restore(cache, snap: tuple[list, list, int]) -> None:
    cache.keys, cache.values, cache.length = list(snap[0]), list(snap[1]), snap[2]
