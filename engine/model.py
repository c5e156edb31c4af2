"""DiffusionGemma forward pass in torch, reading weights from a GGUF through `WeightStore`.

One set of 30 (or N) layers runs in two modes (arch notes §1, §3, §5.3, §5.4):

* encoder mode (`encode`): causal over the new tokens plus the KV cache, writes the cache, uses the
  encoder layer scalars. Prefill goes in chunks, so a long prompt never builds a P x P mask.
* decoder mode (`decode`): the canvas at positions cur..cur+C-1 attends to the cached context plus
  the whole canvas with no mask, reads the cache and never writes it, uses the decoder scalars and
  the self-conditioning input block.

Attribute names follow the GGUF tensor names (`Block.attn_q` holds "blk.{i}.attn_q.weight"), so a
reader can go from the code to the file. Weights are fetched per use (see weights.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F

from gguf_tools.arch import ArchSpec, LayerGeometry

from .row_stats import OnlineRowStats
from .weights import WeightStore, quantized_linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm: fp32 inside, weight used as is (no +1), pow(-0.5) as transformers does."""
    y = x.float()
    y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def gelu_mlp(x: torch.Tensor, linear: Callable[[str, torch.Tensor], torch.Tensor], gate: str, up: str,
             down: str) -> torch.Tensor:
    """down(gelu(gate(x)) * up(x)), `linear(name, x)` applying the named weight."""
    return linear(down, F.gelu(linear(gate, x), approximate="tanh") * linear(up, x))


def inv_freq(g: LayerGeometry) -> torch.Tensor:
    """Sliding layers: plain rope over the head. Full layers ("proportional"): the exponent's
    denominator is the full head dim, and only the first `rotated_pairs` frequencies are non-zero,
    so the remaining dims pass through unrotated (cos 1, sin 0) exactly as in transformers."""
    k = torch.arange(0, 2 * g.rotated_pairs, 2, dtype=torch.int64).to(torch.float32)
    f = 1.0 / (g.rope_base ** (k / g.rope_dims))
    return torch.cat([f, torch.zeros(g.rope_dims // 2 - g.rotated_pairs, dtype=torch.float32)])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half; x [T, heads, d], cos/sin [T, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                            ) -> torch.Tensor:
    """Attention of q [Hq, T, d] over k, v [Hkv, S, d] with Hq = g * Hkv, as plain multi-head attention:
    the g query heads that share a KV head are laid end to end along the query axis (the mask
    repeated to match), so no copy of K/V is made and SDPA never needs its GQA support. On CUDA that
    matters: flash attention stops at head dim 256, and `enable_gqa` with the 512-wide heads of the
    full layers would leave only the math path; the memory-efficient kernel takes this shape."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    g = hq // hkv
    qf = q.reshape(hkv, g * t, d)
    mf = None if mask is None else mask.repeat(g, 1)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mf, scale=1.0)
    return o.reshape(hq, t, -1)


ExpertMLP = Callable[[int, torch.Tensor], torch.Tensor]


def expert_mlp(store: WeightStore, layer: int, e: int, x: torch.Tensor,
               raw_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Routed expert `e` of `layer` on its rows x: gelu(x Wg^T) * (x Wu^T) Wd^T, each weight read
    from the raw 3-D tensor `raw_of(name)` gives (the file's map, or a copy on another device)."""
    *gate_up, down = store.expert_names(layer)

    def lin(name: str, inp: torch.Tensor) -> torch.Tensor:
        observer = getattr(store, "observer", None)  # engine.imatrix_collect: each expert's inputs
        if observer is not None:
            observer(name, inp, e)
        return quantized_linear(inp, raw_of(name)[e], store.info(name).qtype)

    if len(gate_up) == 1:  # fused: gate rows first
        gu = lin(gate_up[0], x)
        f = gu.shape[1] // 2
        gate, up = gu[:, :f], gu[:, f:]
    else:
        gate, up = lin(gate_up[0], x), lin(gate_up[1], x)
    return lin(down, F.gelu(gate, approximate="tanh") * up)


def grouped_experts(u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor, n_experts: int,
                    mlp: ExpertMLP, workers: int = 1) -> torch.Tensor:
    """Experts grouped by expert, `mlp(e, rows) -> out`: one sort, each routed expert applied once
    to all of its rows, results summed once per token.

    With workers > 1 (CPU) the experts are shared out among that many threads, each running torch
    ops single-threaded: one expert's products (a few rows against a 1408 x 2816 matrix) are too
    small for torch's own threads to split well; on 2 cores a 64-token prefill ran 1.3x faster."""
    k = top_i.shape[1]
    flat = top_i.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    token = order // k
    weight = top_w.reshape(-1)[order]
    slots = torch.empty(flat.shape[0], u.shape[1], dtype=u.dtype, device=u.device)
    starts = [0, *accumulate(counts)]
    jobs = [(e, starts[e], n) for e, n in enumerate(counts) if n]

    def run(part: list[tuple[int, int, int]]) -> None:
        for e, start, n in part:
            out = mlp(e, u[token[start:start + n]]) * weight[start:start + n, None]
            slots[order[start:start + n]] = out.to(u.dtype)  # parts write disjoint rows

    if workers <= 1 or len(jobs) < 2:
        run(jobs)
    else:  # every worker takes every workers-th expert: similar row counts, one task each
        list(_expert_pool(workers).map(run, [jobs[i::workers] for i in range(workers)]))
    return slots.view(u.shape[0], k, -1).sum(1)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _expert_pool(workers: int) -> ThreadPoolExecutor:
    # torch.set_num_threads in a worker sets that thread's OpenMP/MKL count (and the default for
    # threads created later); the calling thread keeps its own
    pool = _POOLS.get(workers)
    if pool is None:
        pool = _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="experts",
                                                    initializer=torch.set_num_threads, initargs=(1,))
    return pool


def cpu_expert_workers(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" else 1


@dataclass
class KVCache:
    """Per-layer K/V written by encoder mode: [n_kv_head, T, head_dim] (post norm and rope).

    Sliding layers keep only the last `window - 1` keys: with the new query that is exactly the
    window the next token can see (the same rule as transformers' DynamicSlidingWindowLayer).
    """

    spec: ArchSpec
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0  # tokens encoded so far = position of the next token

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.spec.block_count
            self.values = [None] * self.spec.block_count

    def get(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer], self.values[layer]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Replace a layer's K/V with `k`, `v` (cached + new), trimmed for sliding layers."""
        if self.spec.layer(layer).sliding:
            keep = max(self.spec.sliding_window - 1, 0)
            k, v = k[:, k.shape[1] - min(keep, k.shape[1]):], v[:, v.shape[1] - min(keep, v.shape[1]):]
        self.keys[layer], self.values[layer] = k, v

    def cached_len(self, layer: int) -> int:
        k = self.keys[layer]
        return 0 if k is None else k.shape[1]


class Block:
    """One transformer layer; attributes are the GGUF tensor names of that layer."""

    def __init__(self, model: DiffusionGemmaModel, i: int):
        self.m, self.i = model, i
        self.geo = model.spec.layer(i)
        p = f"blk.{i}."
        for suffix in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                       "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm_1",
                       "ffn_gate_inp", "pre_ffw_norm_2", "ffn_down_exps", "post_ffw_norm_2", "post_ffw_norm"):
            setattr(self, suffix, p + suffix + ".weight")
        self.ffn_gate_inp_scale = p + "ffn_gate_inp.scale"
        self.ffn_down_exps_scale = p + "ffn_down_exps.scale"
        self.layer_output_scale = model.weights.layer_scale_name(i, encoder=False)
        self.enc_layer_output_scale = model.weights.layer_scale_name(i, encoder=True)
        self.inv_freq = inv_freq(self.geo).to(model.device)

    def w(self, name: str) -> torch.Tensor:
        return self.m.weights.get(name, self.m.device, self.m.dtype)

    def lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.m.ops.linear(name, x)

    def norm(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        # norm weights are applied in fp32 (they are stored F32), whatever the compute dtype
        w = None if name is None else self.m.weights.get(name, self.m.device, torch.float32)
        return rms_norm(x, w, self.m.eps)

    # ---- attention --------------------------------------------------------------------------
    def qkv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [Hq, T, d]; k, v [Hkv, T, d] for tokens at absolute positions `pos`."""
        d, t = self.geo.head_dim, x.shape[0]
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = self.norm(self.lin(self.attn_q, x).view(t, -1, d), self.attn_q_norm)
        k_raw = self.lin(self.attn_k, x).view(t, -1, d)
        # k_eq_v: full layers have no v projection; V is the raw k projection (before k_norm/rope)
        v_raw = k_raw if self.geo.k_eq_v else self.lin(self.attn_v, x).view(t, -1, d)
        k = apply_rope(self.norm(k_raw, self.attn_k_norm), cos, sin)
        v = self.norm(v_raw, None)
        q = apply_rope(q, cos, sin)
        return q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # Gemma 4 attention is scale-free: q and k are RMS-normalised, so scale = 1.0, not d^-0.5
        if q.device.type == "cuda" and q.shape[0] != k.shape[0]:
            o = grouped_query_attention(q, k, v, mask)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                               enable_gqa=q.shape[0] != k.shape[0])
        return self.lin(self.attn_output, o.transpose(0, 1).reshape(q.shape[1], -1))

    # ---- feed-forward -----------------------------------------------------------------------
    def moe(self, r: torch.Tensor) -> torch.Tensor:
        s = self.m.spec
        z = self.norm(r, None) * self.w(self.ffn_gate_inp_scale) * s.embedding_length ** -0.5
        probs = torch.softmax(self.lin(self.ffn_gate_inp, z), dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, s.expert_used_count, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        down_scale = self.w(self.ffn_down_exps_scale).float()
        u = self.norm(r, self.pre_ffw_norm_2)
        ex = self.m.expert_executor  # placement hook (engine/experts.py): experts kept in host RAM
        if ex is not None and ex.offloaded(self.i):
            return ex.moe(self.i, u, top_i, top_w * down_scale[top_i])
        w, d = self.m.weights, self.m.device
        return self.m.ops.experts(self.i, u, top_i, top_w, down_scale, lambda name: w.raw(name, d))

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        dense = gelu_mlp(self.norm(h, self.ffn_norm), self.lin, self.ffn_gate, self.ffn_up, self.ffn_down)
        dense = self.norm(dense, self.post_ffw_norm_1)
        moe = self.norm(self.moe(h), self.post_ffw_norm_2)  # router reads the raw residual
        return h + self.norm(dense + moe, self.post_ffw_norm)

    def forward(self, h: torch.Tensor, start: int, cache: KVCache, encoder: bool) -> torch.Tensor:
        """`h` [T, H] holds tokens at positions start..start+T-1."""
        pos = torch.arange(start, start + h.shape[0], device=h.device)
        q, k, v = self.qkv(self.norm(h, self.attn_norm), pos)
        past_k, past_v = cache.get(self.i)
        if past_k is not None:
            k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        else:
            k_all, v_all = k, v
        mask = None
        if encoder:
            kpos = torch.arange(start - (k_all.shape[1] - k.shape[1]), start + k.shape[1], device=h.device)
            mask = kpos[None, :] <= pos[:, None]
            if self.geo.sliding:
                mask &= kpos[None, :] > pos[:, None] - self.m.spec.sliding_window
            cache.store(self.i, k_all, v_all)
        h = h + self.norm(self.attend(q, k_all, v_all, mask), self.post_attention_norm)
        h = self.feed_forward(h)
        return h * self.w(self.enc_layer_output_scale if encoder else self.layer_output_scale)


class TorchOps:
    """The reference implementations of the three heavy operations, in plain torch: every other
    backend is tested against these. Weights are looked up through the model at each call, since
    a placement plan may swap the model's WeightStore."""

    name = "torch"

    def __init__(self, model: DiffusionGemmaModel):
        self.m = model

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.m.weights.linear(name, x)

    def experts(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
                down_scale: torch.Tensor, raw_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Routed experts of `layer` for rows u [T, H]: sum_j top_w * down_scale[e_j] * expert_{e_j}(u),
        each weight read from `raw_of(name)` (resident copy or an offload slot)."""
        w = self.m.weights
        return grouped_experts(u, top_i, top_w * down_scale[top_i], self.m.spec.expert_count,
                               lambda e, x: expert_mlp(w, layer, e, x, raw_of),
                               workers=cpu_expert_workers(u.device))

    def vocab_pass(self, x: torch.Tensor, temperature: float | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.m.torch_vocab_pass(x, temperature)


# Rows of the embedding table dequantized at a time for the tied head and the soft embedding. On CPU
# a small chunk is still in cache when the second product (probabilities @ table) reads it: a 256-row
# vocabulary pass over an F16 table took 12.8 s with 1024 rows against 18.6 s with 32768 (1 thread).
VOCAB_CHUNK = 32768
CPU_VOCAB_CHUNK = 1024


class DiffusionGemmaModel:
    """`encode` fills a KVCache (optionally returning logits); `decode` scores a canvas against it."""

    def __init__(self, weights: WeightStore | str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, prefill_chunk: int = 512, vocab_chunk: int | None = None):
        self.weights = weights if isinstance(weights, WeightStore) else WeightStore(weights)
        self.spec = self.weights.spec
        self.device, self.dtype = torch.device(device), dtype
        self.prefill_chunk = prefill_chunk
        self.vocab_chunk = vocab_chunk or (CPU_VOCAB_CHUNK if self.device.type == "cpu" else VOCAB_CHUNK)
        self.eps = self.spec.layer_norm_rms_epsilon
        self.vocab = self.weights.info("token_embd.weight").shape[0]
        self.blocks = [Block(self, i) for i in range(self.spec.block_count)]
        self.expert_executor = None  # set by engine.experts.attach_plan when a plan offloads experts
        # the kernels behind linear layers, routed experts and the vocabulary pass; TorchOps is the
        # reference, engine.triton_ops.TritonOps the fast path (engine.backend picks one)
        self.ops: TorchOps = TorchOps(self)
        self.step_graphs = None  # engine.graph_step.StepGraphs when denoising steps are replayed as graphs
        # CPU fast path (engine/cpu_steps.py): the row statistics of the last torch vocabulary pass with a
        # temperature, and an optional compute copy of the embedding table that pass reads instead
        self.last_row_stats = None
        self.vocab_table = None
        self.token_embd, self.output_norm = "token_embd.weight", "output_norm.weight"
        self.self_cond_norm = self.weights.self_cond_norm
        self.self_cond_gate, self.self_cond_up, self.self_cond_down = (
            "self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight")

    @property
    def vocab_size(self) -> int:
        return self.vocab

    @property
    def canvas_length(self) -> int:
        return self.spec.canvas_length

    def new_cache(self) -> KVCache:
        return KVCache(self.spec)

    def w(self, name: str) -> torch.Tensor:
        return self.weights.get(name, self.device, self.dtype)

    # ---- embeddings and head ------------------------------------------------------------------
    def embed_scale(self) -> torch.Tensor:
        # cast to the compute dtype first, as transformers does (sqrt(2816) -> 53.0 in bf16)
        return torch.tensor(math.sqrt(self.spec.embedding_length), dtype=torch.float32).to(self.dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights.rows(self.token_embd, tokens, self.device, self.dtype) * self.embed_scale()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm, tied head in vocab chunks (the full table is never dequantized at once),
        then the softcap 30*tanh(x/30) in fp32."""
        return self._vocab_pass(h)[0]

    def _vocab_pass(self, h: torch.Tensor, temperature: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [T, V]; with a temperature also the next step's soft embedding
        softmax(logits / T) @ E * sqrt(H), accumulated with an online softmax from the same
        dequantized chunks of E, so a denoising step reads the table once instead of twice."""
        x = rms_norm(h, self.w(self.output_norm), self.eps)
        logits, soft = self.ops.vocab_pass(x, temperature)
        if soft is not None:
            soft = soft.to(self.dtype) * self.embed_scale()
        return logits, soft

    def torch_vocab_pass(self, x: torch.Tensor, temperature: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference vocabulary pass over output-normed `x`: logits [T, V] fp32 and, with a
        temperature, softmax(logits / T) @ E (fp32, before the sqrt(H) scale).

        With a temperature the sampler's row statistics of z = logits / T (max, logsumexp, entropy,
        argmax; engine.row_stats) are gathered from the same chunks and left in `last_row_stats`,
        so a CPU sampler (engine.cpu_steps) needs no other sweep over [T, V] for them. The table
        chunks come from `vocab_table` when one is set (engine.cpu_steps.VocabTable: a compute copy
        dequantized once; in the compute dtype it holds the same values, in bf16 both products take
        bf16 operands), else they are dequantized here."""
        out = torch.empty(x.shape[0], self.vocab, dtype=torch.float32, device=self.device)
        cap = self.spec.final_logit_softcapping
        soft = run_max = run_sum = stats = None
        if temperature is not None:
            soft = torch.zeros(x.shape[0], self.spec.embedding_length, dtype=torch.float32, device=self.device)
            run_max = torch.full((x.shape[0], 1), -torch.inf, device=self.device)
            run_sum = torch.zeros(x.shape[0], 1, device=self.device)
            stats = OnlineRowStats(x.shape[0], self.device)
        cached = getattr(self, "vocab_table", None)
        x_as = {x.dtype: x}  # x in each table dtype met (a bf16 compute copy multiplies bf16 operands)
        for s in range(0, self.vocab, self.vocab_chunk):
            e = min(s + self.vocab_chunk, self.vocab)
            if cached is not None and cached.holds(s, e, self.device):
                table = cached.rows(s, e)
            else:
                table = self.weights.row_range(self.token_embd, s, e, self.device, self.dtype)
            if table.dtype not in x_as:
                x_as[table.dtype] = x.to(table.dtype)
            chunk = out[:, s:e]
            chunk.copy_(x_as[table.dtype] @ table.T)
            torch.tanh(chunk.div_(cap), out=chunk).mul_(cap)
            if temperature is not None:
                z = chunk / torch.tensor(temperature, dtype=torch.float32, device=self.device)
                z_max = z.amax(-1, keepdim=True)
                new_max = torch.maximum(run_max, z_max)
                rescale = torch.exp(run_max - new_max)
                d = z - new_max
                p = torch.exp(d)
                old_sum = run_sum
                run_sum = run_sum * rescale + p.sum(-1, keepdim=True)
                soft = soft * rescale + (p.to(table.dtype) @ table).float()
                stats.update(z, s, z_max, run_max, new_max, old_sum, d, p)
                run_max = new_max
        if soft is not None:
            self.last_row_stats = stats.result(run_max, run_sum)
            soft = soft / run_sum
        return out, soft

    def soft_embedding(self, prev_logits: torch.Tensor) -> torch.Tensor:
        """softmax(prev logits) @ E * sqrt(H): the expected embedding under the previous step."""
        p = torch.softmax(prev_logits.to(self.device), dim=-1, dtype=torch.float32).to(self.dtype)
        acc = torch.zeros(p.shape[0], self.spec.embedding_length, dtype=self.dtype, device=self.device)
        for s in range(0, self.vocab, self.vocab_chunk):
            e = min(s + self.vocab_chunk, self.vocab)
            acc += p[:, s:e] @ self.weights.row_range(self.token_embd, s, e, self.device, self.dtype)
        return acc * self.embed_scale()

    def decoder_input(self, canvas: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """Scaled canvas embedding plus the self-conditioning MLP of the soft embedding `soft`
        (None on a canvas's first step), then the no-scale norm."""
        e = self.embed(canvas)
        if soft is not None:
            s = rms_norm(soft, self.w(self.self_cond_norm), self.eps)
            e = e + gelu_mlp(s, self.ops.linear, self.self_cond_gate, self.self_cond_up, self.self_cond_down)
        # with no previous logits the MLP sees zeros and returns exactly zero, so it is skipped;
        # the outer no-scale norm always applies to the canvas (never to encoder input)
        return rms_norm(e, None, self.eps)

    # ---- the two modes ----------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, tokens: torch.Tensor, cache: KVCache, return_logits: bool = False,
               chunk_size: int | None = None) -> torch.Tensor | None:
        """Causal pass over `tokens` [P] at positions cache.length.., appending their K/V to the cache."""
        tokens = tokens.reshape(-1).to(self.device)
        chunk = chunk_size or self.prefill_chunk
        outs = []
        for s in range(0, tokens.shape[0], chunk):
            part = tokens[s:s + chunk]
            h = self.embed(part)
            for blk in self.blocks:
                h = blk.forward(h, cache.length, cache, encoder=True)
            cache.length += part.shape[0]
            if return_logits:
                outs.append(self.logits(h))
        if not return_logits:
            return None
        return torch.cat(outs) if outs else torch.empty(0, self.vocab, device=self.device)

    @torch.no_grad()
    def decode(self, canvas: torch.Tensor, cache: KVCache, self_cond_logits: torch.Tensor | None = None,
               start_pos: int | None = None) -> torch.Tensor:
        """Canvas logits [C, V] fp32. The canvas sits at positions start_pos.. (default: right after
        the cached context) and sees every cached key of each layer plus the whole canvas."""
        soft = None if self_cond_logits is None else self.soft_embedding(self_cond_logits)
        return self._decode(canvas, cache, soft, start_pos, None)[0]

    @torch.no_grad()
    def decode_step(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One denoising step: logits [C, V] and the soft embedding the next step feeds back
        (softmax(logits / temperature) @ E * sqrt(H)), from one pass over the embedding table."""
        if self.step_graphs is not None:  # CUDA graph replay on the fast path (engine/graph_step.py)
            logits, soft_next = self.step_graphs.step(canvas, cache, soft, temperature)
        else:
            logits, soft_next = self._decode(canvas, cache, soft, None, temperature)
        assert soft_next is not None
        return logits, soft_next

    def _decode(self, canvas: torch.Tensor, cache: KVCache, soft: torch.Tensor | None, start_pos: int | None,
                temperature: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        canvas = canvas.reshape(-1).to(self.device)
        start = cache.length if start_pos is None else start_pos
        h = self.decoder_input(canvas, soft)
        for blk in self.blocks:
            h = blk.forward(h, start, cache, encoder=False)
        return self._vocab_pass(h, temperature)


__all__ = ["DiffusionGemmaModel", "KVCache", "TorchOps", "rms_norm"]
