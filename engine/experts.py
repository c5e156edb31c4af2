"""Executor for MoE experts that a placement plan (engine/placement.py) keeps in host RAM.

Each offloaded expert layer runs in the mode the plan chose for it:

* "cpu": the routed rows of `u` go to the host, each routed expert is dequantized from the memory
  map a block at a time and applied with torch on the CPU (only the tokens routed to it, the experts
  shared out among worker threads as for resident CPU layers), the summed result goes back.
* "stream": the layer's offloaded expert tensors (still in their stored, quantized type) are copied
  into one of two device slots on a side stream, then the experts run on the compute device exactly
  as resident ones do. Sources are either a pinned arena (the streamed tensors copied once into
  page-locked RAM: one DMA per tensor) or two pinned staging buffers that a worker thread fills
  from the memory map chunk by chunk while the previous chunk is in flight. When layer i starts,
  the next streamed layer (wrapping around to the first one for the next pass) is prefetched into
  the other slot, so the copy overlaps everything the device does in between.

Results do not depend on placement: the same grouped-expert arithmetic as Block.moe, on the same
dequantized weights (CPU mode computes in float32 when the compute device is a GPU, so there the
results agree to rounding). Without a GPU the compute device is the CPU and both paths still run
(plain buffers instead of pinned ones, synchronous copies, the staging worker thread included), so
the offload path is always tested.

Hook: DiffusionGemmaModel.expert_executor; Block.moe hands offloaded layers to `moe()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from .model import DiffusionGemmaModel, cpu_expert_workers, expert_mlp, grouped_experts
from .placement import STAGING_CHUNK, CostModel, PlacementError, Plan, expert_layer_flops
from .weights import WeightStore, dequantize


def _check_tensor(store: WeightStore, name: str, n_bytes: int) -> None:
    if not store.has(name):
        raise PlacementError(f"the plan names {name}, which {store.path.name} does not have "
                             "(a plan made for another model?)")
    if store.info(name).n_bytes != n_bytes:
        raise PlacementError(f"the plan has {n_bytes} bytes for {name}, {store.path.name} holds "
                             f"{store.info(name).n_bytes} (a plan made for another model?)")


class HostTensorStore(WeightStore):
    """A view of a WeightStore in which some non-expert tensors stay in host RAM: on another device
    they are uploaded for each use instead of once (the plan's compute "stream" for them)."""

    def __init__(self, base: WeightStore, host_names: frozenset[str]):  # noqa: D107 - shares base's state
        self.__dict__.update(base.__dict__)
        self.base = base
        self.host_names = host_names

    def raw(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        if device.type != "cpu" and name in self.host_names:
            return self._raw_cpu(self.info(name)).to(device)
        return super().raw(name, device)


class ExpertExecutor:
    """Runs the offloaded expert layers of `plan` for `model` (see the module docstring)."""

    def __init__(self, model: DiffusionGemmaModel, plan: Plan, *, cpu_dtype: torch.dtype | None = None,
                 host_pinning: str | None = None, staging_chunk: int = STAGING_CHUNK):
        self.model, self.plan = model, plan
        self.store: WeightStore = model.weights
        dev = torch.device(model.device)
        self.cuda = dev.type == "cuda"
        if self.cuda and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype = dev, model.dtype
        # on a CPU-only machine the CPU path computes exactly as resident layers do
        self.cpu_dtype = cpu_dtype or (torch.float32 if self.cuda else model.dtype)
        self.n_experts = model.spec.expert_count
        self.modes = plan.layer_modes()
        self.host: dict[int, list[str]] = {}
        for t in plan.tensors:
            if t.expert and t.device == "cpu":
                _check_tensor(self.store, t.name, t.bytes)
                assert t.layer is not None
                self.host.setdefault(t.layer, []).append(t.name)
        self.stream_layers = sorted(i for i, m in self.modes.items() if m == "stream")
        self.pinning = host_pinning or (plan.host_pinning if plan.host_pinning != "none" else "staging")
        if self.pinning not in ("arena", "staging"):
            raise PlacementError(f"host pinning {self.pinning!r}: use arena or staging")
        self.staging_chunk = staging_chunk
        self.stats: dict[str, float] = {"cpu_layer_calls": 0, "cpu_s": 0.0, "stream_layer_calls": 0,
                                        "bytes_streamed": 0, "stream_wait_s": 0.0, "sync_loads": 0}
        self._layout: dict[int, list[tuple[str, int, int, tuple[int, ...]]]] = {}
        slot_bytes = 0
        for i in self.stream_layers:
            off, rows = 0, []
            for name in self.host[i]:
                raw = self.store.raw(name, "cpu")
                rows.append((name, off, raw.numel(), tuple(raw.shape)))
                off += -(-raw.numel() // 256) * 256  # keep every view 256-byte aligned
            self._layout[i] = rows
            slot_bytes = max(slot_bytes, off)
        self._slots: list[torch.Tensor] = []
        self._slot_layer: list[int | None] = [None, None]
        self._pending: list[Future | None] = [None, None]
        self._current = 1
        self._arena: dict[str, torch.Tensor] = {}
        self._staging: list[torch.Tensor] = []
        self._pool: ThreadPoolExecutor | None = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.stream_layers else None
        self._ready = [torch.cuda.Event() for _ in range(2)] if self._copy_stream else []
        self._free = [torch.cuda.Event() for _ in range(2)] if self._copy_stream else []
        self._staged = [torch.cuda.Event() for _ in range(2)] if self._copy_stream else []
        if self.stream_layers:
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
            if self.pinning == "arena":
                for i in self.stream_layers:
                    for name, _, n, _ in self._layout[i]:
                        buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
                        buf.copy_(self.store.raw(name, "cpu").reshape(-1))
                        self._arena[name] = buf
            else:
                self._staging = [torch.empty(staging_chunk, dtype=torch.uint8, pin_memory=self.cuda)
                                 for _ in range(2)]
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-staging")

    # ---- the hook Block.moe calls -------------------------------------------------------------
    def offloaded(self, layer: int) -> bool:
        return layer in self.modes

    def moe(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, H] for layer `layer` (u [T, H], top_i/top_w [T, k])."""
        if self.modes[layer] == "cpu":
            return self._moe_cpu(layer, u, top_i, top_w)
        return self._moe_stream(layer, u, top_i, top_w)

    # ---- CPU compute --------------------------------------------------------------------------
    def _moe_cpu(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        cpu = torch.device("cpu")
        uc = u.to(cpu, self.cpu_dtype)
        ti, tw = top_i.to(cpu), top_w.to(cpu)
        store = self.store

        out = grouped_experts(uc, ti, tw, self.n_experts,
                              lambda e, x: expert_mlp(store, layer, e, x, lambda name: store.raw(name, cpu)),
                              workers=cpu_expert_workers(cpu))
        out = out.to(self.device, u.dtype)
        self.stats["cpu_layer_calls"] += 1
        self.stats["cpu_s"] += time.perf_counter() - t0
        return out

    # ---- streaming ----------------------------------------------------------------------------
    def _moe_stream(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        s = self._acquire(layer)
        nxt = self._next_stream(layer)
        if nxt != layer:
            self._prefetch(nxt, 1 - s)
        views = {name: self._slots[s][off:off + n].view(shape) for name, off, n, shape in self._layout[layer]}
        store, dev = self.store, self.device

        def raw_of(name: str) -> torch.Tensor:
            v = views.get(name)
            return v if v is not None else store.raw(name, dev)  # a resident part of a partly offloaded layer

        # the model's own operations (the grouped kernel on the fast path) run out of the slot;
        # top_w already carries ffn_down_exps.scale, so the scale handed over is exactly 1
        out = self.model.ops.experts(layer, u, top_i, top_w, self._unit_scale(u.device), raw_of)
        if self._copy_stream is not None:
            self._free[s].record(torch.cuda.current_stream(self.device))
        self.stats["stream_layer_calls"] += 1
        return out

    def _unit_scale(self, device: torch.device) -> torch.Tensor:
        if getattr(self, "_ones", None) is None or self._ones.device != device:
            self._ones = torch.ones(self.n_experts, dtype=torch.float32, device=device)
        return self._ones

    def _next_stream(self, layer: int) -> int:
        later = [i for i in self.stream_layers if i > layer]
        return later[0] if later else self.stream_layers[0]

    def _acquire(self, layer: int) -> int:
        if layer in self._slot_layer:
            s = self._slot_layer.index(layer)
        else:  # not prefetched (first pass, or an interrupted one): load it now
            s = 1 - self._current
            self._load(layer, s)
            self.stats["sync_loads"] += 1
        t0 = time.perf_counter()
        self._wait(s)
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._ready[s])
        self.stats["stream_wait_s"] += time.perf_counter() - t0
        self._current = s
        return s

    def _prefetch(self, layer: int, s: int) -> None:
        if self._slot_layer[s] == layer:
            return  # still there (two or fewer streamed layers), or already on its way
        self._load(layer, s)

    def _wait(self, s: int) -> None:
        f = self._pending[s]
        if f is not None:
            self._pending[s] = None
            f.result()

    def _load(self, layer: int, s: int) -> None:
        self._wait(s)  # a copy still running into this slot must finish before the slot is reused
        self._slot_layer[s] = None
        if self.pinning == "arena":
            self._copy_from_arena(layer, s)
        else:
            assert self._pool is not None
            self._pending[s] = self._pool.submit(self._copy_staged, layer, s)
        self._slot_layer[s] = layer
        self.stats["bytes_streamed"] += sum(n for _, _, n, _ in self._layout[layer])

    def _copy_from_arena(self, layer: int, s: int) -> None:
        slot = self._slots[s]
        if self._copy_stream is None:
            for name, off, n, _ in self._layout[layer]:
                slot[off:off + n].copy_(self._arena[name])
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._free[s])  # the slot's previous layer is done with it
            for name, off, n, _ in self._layout[layer]:
                slot[off:off + n].copy_(self._arena[name], non_blocking=True)
            self._ready[s].record(self._copy_stream)

    def _copy_staged(self, layer: int, s: int) -> None:
        """Worker thread: memory map -> pinned staging buffer (CPU copy) -> slot (DMA), double-buffered."""
        slot, chunk, b = self._slots[s], self.staging_chunk, 0
        cs = self._copy_stream
        if cs is not None:
            torch.cuda.set_device(self.device)
            cs.wait_event(self._free[s])
        for name, off, n, _ in self._layout[layer]:
            src = self.store.raw(name, "cpu").reshape(-1)
            for a in range(0, n, chunk):
                m = min(chunk, n - a)
                buf = self._staging[b][:m]
                if cs is None:
                    buf.copy_(src[a:a + m])
                    slot[off + a:off + a + m].copy_(buf)
                else:
                    self._staged[b].synchronize()  # this buffer's previous DMA has finished
                    buf.copy_(src[a:a + m])
                    with torch.cuda.stream(cs):
                        slot[off + a:off + a + m].copy_(buf, non_blocking=True)
                        self._staged[b].record(cs)
                b ^= 1
        if cs is not None:
            self._ready[s].record(cs)

    def close(self) -> None:
        for s in range(2):
            self._wait(s)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._slots, self._arena, self._staging = [], {}, []
        self._slot_layer = [None, None]


# ---- wiring -------------------------------------------------------------------------------------

def attach_plan(model: DiffusionGemmaModel, plan: Plan, *, cpu_dtype: torch.dtype | None = None,
                host_pinning: str | None = None, staging_chunk: int = STAGING_CHUNK) -> ExpertExecutor:
    """Make `model` follow `plan`: offloaded expert layers go through an ExpertExecutor, non-expert
    tensors the plan keeps in host RAM are uploaded per use, and any device copy of an offloaded
    tensor is dropped. Raises PlacementError when the plan does not fit."""
    plan.require()
    detach(model)
    base = model.weights
    host_other = frozenset(t.name for t in plan.tensors if t.device == "cpu" and not t.expert)
    for t in plan.tensors:
        _check_tensor(base, t.name, t.bytes)
    evict = {t.name for t in plan.tensors if t.device == "cpu"}
    for key in [k for k in base._raw_on if k[0] in evict]:  # device copies from an earlier placement
        del base._raw_on[key]
    if host_other:
        model.weights = HostTensorStore(base, host_other)
    ex = ExpertExecutor(model, plan, cpu_dtype=cpu_dtype, host_pinning=host_pinning, staging_chunk=staging_chunk)
    model.expert_executor = ex
    if torch.device(model.device).type == "cuda":
        torch.cuda.empty_cache()
    return ex


def detach(model: DiffusionGemmaModel) -> None:
    """Back to every tensor resident (uploaded on first use)."""
    ex = getattr(model, "expert_executor", None)
    if ex is not None:
        ex.close()
    model.expert_executor = None
    if isinstance(model.weights, HostTensorStore):
        model.weights = model.weights.base


# ---- measurements for the cost model ------------------------------------------------------------

# fp16 scale fields (byte offset, value) per block that keep synthetic weights near +-0.02
_SCALES: dict[Q, tuple[tuple[int, float], ...]] = {
    Q.Q4_0: ((0, 2.5e-3),), Q.Q4_1: ((0, 2.5e-3), (2, -0.02)), Q.Q5_0: ((0, 1.25e-3),),
    Q.Q5_1: ((0, 1.25e-3), (2, -0.02)), Q.Q8_0: ((0, 1.6e-4),), Q.Q2_K: ((80, 4e-4), (82, 4e-4)),
    Q.Q3_K: ((108, 3e-4),), Q.Q4_K: ((0, 2e-5), (2, 2e-5)), Q.Q5_K: ((0, 1e-5), (2, 1e-5)),
    Q.Q6_K: ((208, 5e-6),), Q.IQ4_NL: ((0, 1.6e-4),), Q.IQ4_XS: ((0, 1.6e-4),),
}


def synthetic_blocks(qtype: Q, n_blocks: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Random blocks of a quantized type, uint8 [n_blocks, type_size], whose scales are finite and
    small (random bytes there would give NaN/Inf or huge weights)."""
    _, size = GGML_QUANT_SIZES[qtype]
    if qtype not in _SCALES:
        raise ValueError(f"no synthetic block layout for {qtype.name}")
    raw = torch.randint(0, 256, (n_blocks, size), dtype=torch.uint8, device=device, generator=generator)
    for off, value in _SCALES[qtype]:
        half = torch.tensor(np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8).copy(), device=device)
        raw[:, off:off + 2] = half
    return raw


def _best(fn: Callable[[], None], reps: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure_link(device: torch.device | str, n_bytes: int = 256 * (1 << 20), pinned: bool = True) -> float:
    """Host -> device bytes per second (pinned or pageable source); memcpy speed on a CPU device."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=cuda and pinned).fill_(1)
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    return n_bytes / _best(lambda: dst.copy_(src, non_blocking=cuda and pinned), 3, sync)


def measure_costs(device: torch.device | str, spec=None, qtype: Q = Q.Q4_K, quick: bool = False) -> CostModel:
    """The cost model's throughputs measured here: the host->device link (pinned), CPU dequantization
    of `qtype` and CPU matmul on expert-shaped operands (16 rows, as a 256-token canvas gives each
    expert), and the device's own copy bandwidth as its weight-read rate."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    H = spec.embedding_length if spec is not None else 2816
    F = spec.expert_feed_forward_length if spec is not None else 704
    mib = 1 << 20
    link = measure_link(dev, (32 if quick else 256) * mib)
    blocks = synthetic_blocks(qtype, max(1, (8 if quick else 32) * mib // GGML_QUANT_SIZES[qtype][1]))
    dq = blocks.numel() / _best(lambda: dequantize(blocks, qtype), 2)
    x, w = torch.randn(16, H), torch.randn(2 * F, H)
    flops = 2 * 16 * H * 2 * F
    reps = 4 if quick else 16
    mm = flops * reps / _best(lambda: [x @ w.T for _ in range(reps)], 2)
    if cuda:
        n = 256 * mib
        a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
        gpu = 2 * n / _best(lambda: b.copy_(a), 3, lambda: torch.cuda.synchronize(dev))
    else:
        gpu = dq  # a CPU compute device dequantizes resident weights at the same rate
    return CostModel(link_bytes_per_s=link, cpu_flops=mm, cpu_dequant_bytes_per_s=dq, gpu_bytes_per_s=gpu,
                     source=f"measured on {dev.type}")


__all__ = ["ExpertExecutor", "HostTensorStore", "attach_plan", "detach", "expert_layer_flops", "expert_mlp",
           "grouped_experts", "measure_costs", "measure_link", "synthetic_blocks"]
