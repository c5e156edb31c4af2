"""A denoising step captured as one CUDA graph and replayed for every later step of the canvas.

Within a canvas nothing a step depends on changes shape: the cached context is fixed (the cache is
written only when a canvas is committed), the canvas has C tokens, the self-conditioning input is
[C, H]. So the decoder pass and the vocabulary pass of step 2 are captured once, into static input
buffers (canvas ids, soft embedding, temperature as a device scalar), and steps 3.. replay that
graph after copying their inputs in: a few launches per step instead of thousands, and no host
round trip. The first step of a canvas has no self-conditioning input (a different graph) and runs
eagerly; a new context length (the next canvas) captures again.

Only the fast path (engine.triton_ops.TritonOps) is capturable: the torch reference reads expert
counts back to the host. Everywhere else `StepGraphs.step` is the eager decode_step.
"""

from __future__ import annotations

import torch


class StepGraphs:
    def __init__(self, model, warmup: int = 1):
        self.m = model
        self.warmup = warmup
        self.enabled = torch.device(model.device).type == "cuda"
        self.captures = 0  # how many graphs were captured (one per canvas context)
        self.replays = 0
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._pool = None
        self._canvas = self._soft = self._temp = None
        self._out: tuple[torch.Tensor, torch.Tensor] | None = None

    def _eager(self, canvas, cache, soft, temperature):
        return self.m._decode(canvas, cache, soft, None, temperature)

    def step(self, canvas: torch.Tensor, cache, soft: torch.Tensor | None, temperature: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
        # streamed expert layers copy on a side stream under host control: those steps stay eager
        if not self.enabled or soft is None or self.m.expert_executor is not None:
            logits, soft_next = self._eager(canvas, cache, soft, temperature)
            return logits, soft_next
        key = (cache.length, tuple(canvas.shape), tuple(soft.shape), soft.dtype,
               tuple(id(k) for k in cache.keys))
        if key != self._key:
            self._capture(key, canvas, cache, soft)
        assert self._canvas is not None and self._soft is not None and self._temp is not None
        self._canvas.copy_(canvas.reshape(-1), non_blocking=True)
        if soft.data_ptr() != self._soft.data_ptr():
            self._soft.copy_(soft, non_blocking=True)
        self._temp.fill_(temperature)
        assert self._graph is not None and self._out is not None
        self._graph.replay()
        self.replays += 1
        logits, soft_next = self._out
        # the next step hands soft_next back as its input: the copy above then moves it into the
        # input buffer, so the graph's output buffer can be overwritten by that replay
        return logits, soft_next

    def _capture(self, key, canvas, cache, soft) -> None:
        dev = torch.device(self.m.device)
        self._graph = None
        self._out = None
        self._canvas = canvas.reshape(-1).clone()
        self._soft = soft.clone()
        self._temp = torch.ones((), dtype=torch.float32, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # compiles kernels and settles allocations before capture
            for _ in range(self.warmup):
                self._eager(self._canvas, cache, self._soft, self._temp)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._out = self._eager(self._canvas, cache, self._soft, self._temp)
        self._graph = graph
        self._key = key
        self.captures += 1


__all__ = ["StepGraphs"]
