"""Continuous batching against engine.generate.generate, one sequence at a time (what run does)."""

from __future__ import annotations

import threading

import pytest
import torch

from engine.generate import ModelRunner, generate
from engine.run import load, prompt_ids, sampler_kwargs
from engine.scheduler import Accepted, CanvasDone, Draft, Failed, Finished, Job, QueueFull, Scheduler, ShuttingDown

WAIT_S = 120


def reference(m, ids, max_new, seed, kw):
    r = generate(ModelRunner(m), torch.tensor(ids), max_new_tokens=max_new,
                 generator=torch.Generator().manual_seed(seed), **kw)
    return r.tokens.tolist(), r.steps_per_canvas, r.finished


class Collector:
    def __init__(self, n: int):
        self.events: dict[int, list] = {i: [] for i in range(n)}
        self.left = n
        self.done = threading.Event()
        self.lock = threading.Lock()

    def for_job(self, i: int):
        def on_event(ev):
            with self.lock:
                self.events[i].append(ev)
                if isinstance(ev, Finished | Failed):
                    self.left -= 1
                    if self.left == 0:
                        self.done.set()
        return on_event

    def final(self, i: int):
        return self.events[i][-1]


def run_jobs(m, jobs: list[Job], max_batch: int) -> Collector:
    col = Collector(len(jobs))
    sch = Scheduler(m, max_batch=max_batch, max_queue=len(jobs))
    for i, job in enumerate(jobs):
        job.on_event = col.for_job(i)
        sch.submit(job)
    sch.start()
    try:
        assert col.done.wait(WAIT_S), "jobs did not finish"
    finally:
        sch.close(WAIT_S)
    return col


@pytest.fixture(scope="module")
def default_lm():
    return load(None, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_lm(tiny_gguf):
    return load(tiny_gguf, torch.device("cpu"))


def test_tokens_equal_generate_whatever_the_batch(default_lm, tiny_lm, one_thread):
    """Default model (answers end at EOS) and the random tiny model (several canvases, budgets that
    are no multiple of the canvas), at most 3 sequences at once so jobs join mid-flight; drafts on
    for some: one Draft per step."""
    cases = []
    for lm, budgets in ((default_lm, (256, 30, 12)), (tiny_lm, (40, 5, 33, 16))):
        kw = sampler_kwargs(lm.model.spec)
        for seed, mx in enumerate(budgets):
            prompt = ["Sort: 7 3 9 1 4", "Sort: 5 2 8", "hello there", "x"][seed % 4]
            cases.append((lm.model, prompt_ids(lm.tokenizer, prompt), mx, seed + 3, kw))
    for m in (default_lm.model, tiny_lm.model):
        mine = [c for c in cases if c[0] is m]
        jobs = [Job(ids, mx, kw, seed, drafts=seed % 2 == 0) for _, ids, mx, seed, kw in mine]
        col = run_jobs(m, jobs, max_batch=3)
        for i, (_, ids, mx, seed, kw) in enumerate(mine):
            fin = col.final(i)
            assert isinstance(fin, Finished), fin
            assert (fin.tokens, fin.steps_per_canvas, fin.finished) == reference(m, ids, mx, seed, kw)
            evs = col.events[i]
            assert isinstance(evs[0], Accepted) and evs[0].prompt_tokens == len(ids)
            canvases = [e for e in evs if isinstance(e, CanvasDone)]
            assert [t for e in canvases for t in e.tokens] == fin.tokens
            drafts = [e for e in evs if isinstance(e, Draft)]
            assert len(drafts) == (sum(fin.steps_per_canvas) if jobs[i].drafts else 0)


def test_a_failing_request_fails_alone(default_lm, one_thread):
    """A job whose ids are out of the vocabulary makes the batched pass raise; the pass is rerun
    segment by segment, that job fails, the others finish with generate()'s tokens."""
    m, tok = default_lm.model, default_lm.tokenizer
    kw = sampler_kwargs(m.spec)
    good = [prompt_ids(tok, p) for p in ("Sort: 4 1 3", "Sort: 9 0 5 2")]
    jobs = [Job(good[0], 24, kw, 1), Job([2, m.vocab_size + 7, 5], 24, kw, 2), Job(good[1], 24, kw, 3)]
    col = run_jobs(m, jobs, max_batch=3)
    assert isinstance(col.final(1), Failed) and col.final(1).status == 500
    for i, ids, seed in ((0, good[0], 1), (2, good[1], 3)):
        fin = col.final(i)
        assert isinstance(fin, Finished)
        assert (fin.tokens, fin.steps_per_canvas, fin.finished) == reference(m, ids, 24, seed, kw)


def test_prepare_runs_on_the_engine_and_its_error_is_the_jobs(default_lm, one_thread):
    m, tok = default_lm.model, default_lm.tokenizer
    kw = sampler_kwargs(m.spec)

    class Bad(ValueError):
        status, message, code = 400, "too long", "context_length_exceeded"

    def bad():
        raise Bad

    seen = []
    jobs = [Job([], 0, kw, 0, prepare=bad),
            Job([], 0, kw, 5, prepare=lambda: (seen.append(threading.current_thread().name) or
                                               prompt_ids(tok, "Sort: 2 1"), 12))]
    col = run_jobs(m, jobs, max_batch=2)
    assert col.final(0) == Failed("too long", 400, "context_length_exceeded")
    assert seen == ["diffgemma-engine"]
    fin = col.final(1)
    assert (fin.tokens, fin.steps_per_canvas, fin.finished) == reference(m, prompt_ids(tok, "Sort: 2 1"), 12, 5, kw)


def test_cancel_frees_the_slot(default_lm, one_thread):
    """With one slot, a job that would run for minutes is cancelled; the queued one then runs."""
    m, tok = default_lm.model, default_lm.tokenizer
    kw = sampler_kwargs(m.spec)
    endless = dict(kw, steps=10_000, t_min=50.0, t_max=50.0, entropy_bound=1e-9)
    ids = prompt_ids(tok, "Sort: 6 2 8")
    steps_seen = threading.Event()
    long_job = Job(ids, 12, endless, 0, drafts=True, on_event=lambda ev: isinstance(ev, Draft) and steps_seen.set())
    sch = Scheduler(m, max_batch=1, max_queue=4).start()
    try:
        sch.submit(long_job)
        assert steps_seen.wait(WAIT_S)
        col = Collector(1)
        sch.submit(Job(ids, 12, kw, 4, on_event=col.for_job(0)))
        assert sch.queued == 1 and sch.busy == 1
        long_job.cancel()
        assert col.done.wait(WAIT_S)
        fin = col.final(0)
        assert (fin.tokens, fin.steps_per_canvas, fin.finished) == reference(m, ids, 12, 4, kw)
        assert sch.stats["cancelled"] == 1
    finally:
        sch.close(WAIT_S)


def test_queue_limit_and_drain(default_lm):
    m, tok = default_lm.model, default_lm.tokenizer
    kw = sampler_kwargs(m.spec)
    ids = prompt_ids(tok, "Sort: 1 2")
    sch = Scheduler(m, max_batch=1, max_queue=1)  # not started: nothing leaves the queue
    col = Collector(2)
    sch.submit(Job(ids, 12, kw, 0, on_event=col.for_job(0)))  # would take the free slot
    sch.submit(Job(ids, 12, kw, 1, on_event=col.for_job(1)))  # waits
    with pytest.raises(QueueFull):
        sch.submit(Job(ids, 12, kw, 2))
    sch.drain()
    with pytest.raises(ShuttingDown):
        sch.submit(Job(ids, 12, kw, 3))
    sch.start()
    try:
        assert col.done.wait(WAIT_S)
        assert col.final(0) == Failed("the server is shutting down", 503)
        assert col.final(1) == Failed("the server is shutting down", 503)
    finally:
        sch.close(WAIT_S)
