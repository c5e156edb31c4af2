"""One pass of the model over several sequences at once: denoising steps and prefill chunks together.

A server denoises the canvases of concurrent requests; each step is a C-row matrix problem whose
cost, for a small C, is mostly reading (and on the torch backend dequantizing) the weights. This
module runs B segments -- each a canvas at its step or a chunk of a prompt being prefilled, with its
own KV cache, positions and mode -- through the layers together, so every weight block is read and
dequantized once per pass instead of once per sequence.

Batch independence, by construction: a request's tokens must not depend on what else is in the
batch, and one flipped sampler decision changes everything after it, so "close" is not enough.
Measured on torch's CPU kernels (the reasons behind each rule):

* matrix products give rows that depend on the total row count (small-M kernels differ from the
  blocked ones by up to 1e-4): every product runs per segment, with exactly the shapes the
  one-sequence pass (engine.model) uses, against the weight block dequantized once for all of them.
  The routed experts run per (expert, segment) run of rows, in the order grouped_experts uses.
* tanh-GELU is vectorized with a scalar tail, so an element's value depends on where it sits in
  the tensor: it runs per segment, on tensors of the one-sequence shapes.
* everything else -- norms and other row reductions, softmax/top-k routing, rope's cos/sin (vml),
  tanh, exp, plain arithmetic -- is the same per row whatever the other rows, and runs once over
  all rows concatenated; that is where the per-op overhead is shared.

tests/engine/test_batch.py checks the logits, soft embeddings and KV caches bit for bit against
`DiffusionGemmaModel.decode_step` / `encode` for mixed batches. Other backends (TritonOps) and
offloaded expert layers get their unchanged per-segment calls: still exact, nothing shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import weights as _weights
from .model import Block, DiffusionGemmaModel, KVCache, TorchOps, _expert_pool, apply_rope, cpu_expert_workers, rms_norm
from .weights import dequantize

__all__ = ["BatchedPass", "Segment", "SegmentOutput"]


@dataclass
class Segment:
    """One sequence's rows in a pass. Encoder segments (a prompt chunk or a committed canvas) are
    appended to their cache; decoder segments (a canvas at one denoising step) only read it."""

    cache: KVCache
    tokens: torch.Tensor  # [T] ids
    encoder: bool = False
    soft: torch.Tensor | None = None  # decoder: the previous step's soft embedding (None: first step)
    temperature: float | None = None  # decoder: this step's temperature


@dataclass
class SegmentOutput:
    logits: torch.Tensor  # [C, V] fp32, as DiffusionGemmaModel.decode_step returns them
    soft: torch.Tensor  # the next step's soft embedding


class _Rows:
    """Row ranges of the segments inside the concatenated [N, ...] tensors."""

    def __init__(self, lengths: Sequence[int]):
        self.bounds: list[tuple[int, int]] = []
        at = 0
        for n in lengths:
            self.bounds.append((at, at + n))
            at += n
        self.n = at

    def per_segment(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn applied to each segment's rows separately (ops whose values depend on the tensor's size)."""
        if len(self.bounds) == 1:
            return fn(x)
        return torch.cat([fn(x[a:b]) for a, b in self.bounds])

    def linear(self, w: _DequantizedWeight, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T, one product per segment, written in place into the rows of one output."""
        if len(self.bounds) == 1:
            return w.apply(x)
        out = torch.empty(x.shape[0], w.rows, dtype=x.dtype, device=x.device)
        for a, b in self.bounds:
            w.apply(x[a:b], out[a:b])
        return out


class _DequantizedWeight:
    """One weight dequantized block by block exactly as engine.weights.quantized_linear does it for
    an input of width `cols`, kept for the pass's segments (one dequantization, many products)."""

    def __init__(self, raw: torch.Tensor, qtype, x_like: torch.Tensor):
        self.rows = raw.shape[0]
        step = (self.rows if x_like.device.type != "cpu"
                else max(1, _weights.CPU_BLOCK_BYTES // (x_like.shape[-1] * x_like.element_size())))
        self.whole = step >= self.rows
        if self.whole:
            self.blocks = [(0, dequantize(raw, qtype).to(x_like.dtype))]
        else:
            self.blocks = [(s, dequantize(raw[s:s + step], qtype).to(x_like.dtype)) for s in range(0, self.rows, step)]

    def apply(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T; `out` (contiguous rows, [n, rows]) receives it when given -- the product into a
        given output is the same kernel call as into a fresh one (torch.mm / mm.out)."""
        if self.whole:
            w = self.blocks[0][1]
            return x @ w.T if out is None else torch.mm(x, w.T, out=out)
        if out is None:
            out = torch.empty(x.shape[0], self.rows, dtype=x.dtype, device=x.device)
        for s, w in self.blocks:
            torch.mm(x, w.T, out=out[:, s:s + w.shape[0]])
        return out


class BatchedPass:
    """`run(segments)`: one pass of `model` over all of them; returns, per segment, None for an
    encoder segment (its cache now holds the chunk) or a SegmentOutput for a decoder segment."""

    def __init__(self, model: DiffusionGemmaModel):
        self.m = model

    @property
    def shared(self) -> bool:
        # the reference torch operations: their arithmetic is reproduced here with shared weights.
        # Subclasses (TritonOps) have their own kernels, which get per-segment calls instead.
        return type(self.m.ops) is TorchOps

    @torch.no_grad()
    def run(self, segments: Sequence[Segment]) -> list[SegmentOutput | None]:
        m = self.m
        if not segments:
            return []
        for s in segments:
            if not s.encoder and s.temperature is None:
                raise ValueError("a decoder segment needs its step's temperature")
        if len(segments) == 1:  # nothing to share: the one-sequence pass itself, without this one's overhead
            s = segments[0]
            if s.encoder:
                m.encode(s.tokens, s.cache, chunk_size=max(int(s.tokens.numel()), 1))
                return [None]
            assert s.temperature is not None
            return [SegmentOutput(*m.decode_step(s.tokens, s.cache, s.soft, s.temperature))]
        rows = _Rows([int(s.tokens.numel()) for s in segments])
        starts = [s.cache.length for s in segments]
        h = self._inputs(segments, rows)
        scale = self._layer_scale_rows(segments, rows)
        for blk in m.blocks:
            h = self._layer(blk, h, segments, starts, rows, scale(blk))
        for s, (a, b) in zip(segments, rows.bounds):
            if s.encoder:
                s.cache.length += b - a
        dec = [i for i, s in enumerate(segments) if not s.encoder]
        outs: list[SegmentOutput | None] = [None] * len(segments)
        if dec:
            dec_rows = _Rows([rows.bounds[i][1] - rows.bounds[i][0] for i in dec])
            hd = torch.cat([h[rows.bounds[i][0]:rows.bounds[i][1]] for i in dec]) if len(dec) < len(segments) else h
            for i, out in zip(dec, self._vocab_pass(hd, [segments[i].temperature for i in dec], dec_rows)):
                outs[i] = out
        return outs

    # ---- linear layers ----------------------------------------------------------------------
    def _lin(self, name: str, x: torch.Tensor, rows: _Rows) -> torch.Tensor:
        m = self.m
        if not self.shared:
            return rows.per_segment(lambda part: m.ops.linear(name, part), x)
        return rows.linear(_DequantizedWeight(m.weights.raw(name, x.device), m.weights.info(name).qtype, x), x)

    def _gelu_mlp(self, x: torch.Tensor, gate: str, up: str, down: str, rows: _Rows) -> torch.Tensor:
        g = rows.per_segment(lambda part: F.gelu(part, approximate="tanh"), self._lin(gate, x, rows))
        return self._lin(down, g * self._lin(up, x, rows), rows)

    # ---- inputs -----------------------------------------------------------------------------
    def _inputs(self, segments: Sequence[Segment], rows: _Rows) -> torch.Tensor:
        """Encoder rows: the scaled embedding. Decoder rows: the scaled embedding plus the
        self-conditioning MLP of the soft embedding (when there is one), then the no-scale norm."""
        m = self.m
        tokens = torch.cat([s.tokens.reshape(-1).to(m.device) for s in segments])
        h = m.embed(tokens)
        with_soft = [i for i, s in enumerate(segments) if not s.encoder and s.soft is not None]
        if with_soft:
            sc_rows = _Rows([rows.bounds[i][1] - rows.bounds[i][0] for i in with_soft])
            soft = torch.cat([segments[i].soft for i in with_soft])
            s = rms_norm(soft, m.w(m.self_cond_norm), m.eps)
            mlp = self._gelu_mlp(s, m.self_cond_gate, m.self_cond_up, m.self_cond_down, sc_rows)
            for i, (a, b) in zip(with_soft, sc_rows.bounds):
                lo, hi = rows.bounds[i]
                h[lo:hi] = h[lo:hi] + mlp[a:b]
        for s, (a, b) in zip(segments, rows.bounds):
            if not s.encoder:
                h[a:b] = rms_norm(h[a:b], None, m.eps)
        return h

    def _layer_scale_rows(self, segments: Sequence[Segment], rows: _Rows) -> Callable[[Block], torch.Tensor]:
        """Each layer's output scale: the encoder's for encoder rows, the decoder's for the others
        (a [1] tensor when all segments share a mode, else one value per row)."""
        modes = {s.encoder for s in segments}
        if len(modes) == 1:
            enc = modes.pop()
            return lambda blk: blk.w(blk.enc_layer_output_scale if enc else blk.layer_output_scale)
        is_enc = torch.cat([torch.full((b - a, 1), s.encoder, dtype=torch.bool)
                            for s, (a, b) in zip(segments, rows.bounds)]).to(self.m.device)
        return lambda blk: torch.where(is_enc, blk.w(blk.enc_layer_output_scale), blk.w(blk.layer_output_scale))

    # ---- one layer --------------------------------------------------------------------------
    def _layer(self, blk: Block, h: torch.Tensor, segments: Sequence[Segment], starts: list[int], rows: _Rows,
               out_scale: torch.Tensor) -> torch.Tensor:
        geo = blk.geo
        d, n = geo.head_dim, rows.n
        x = blk.norm(h, blk.attn_norm)
        pos = torch.cat([torch.arange(st, st + (b - a), device=h.device) for st, (a, b) in zip(starts, rows.bounds)])
        freqs = pos.float()[:, None] * blk.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = blk.norm(self._lin(blk.attn_q, x, rows).view(n, -1, d), blk.attn_q_norm)
        k_raw = self._lin(blk.attn_k, x, rows).view(n, -1, d)
        v_raw = k_raw if geo.k_eq_v else self._lin(blk.attn_v, x, rows).view(n, -1, d)
        k = apply_rope(blk.norm(k_raw, blk.attn_k_norm), cos, sin).transpose(0, 1)
        v = blk.norm(v_raw, None).transpose(0, 1)
        q = apply_rope(q, cos, sin).transpose(0, 1)
        o = torch.cat([self._attend(blk, q[:, a:b], k[:, a:b], v[:, a:b], s, st)
                       for s, st, (a, b) in zip(segments, starts, rows.bounds)])
        h = h + blk.norm(self._lin(blk.attn_output, o, rows), blk.post_attention_norm)
        dense = self._gelu_mlp(blk.norm(h, blk.ffn_norm), blk.ffn_gate, blk.ffn_up, blk.ffn_down, rows)
        dense = blk.norm(dense, blk.post_ffw_norm_1)
        moe = blk.norm(self._moe(blk, h, rows), blk.post_ffw_norm_2)
        h = h + blk.norm(dense + moe, blk.post_ffw_norm)
        return h * out_scale

    def _attend(self, blk: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segment,
                start: int) -> torch.Tensor:
        """Block.forward's attention for one segment against its own cache; [T, Hq * d] out."""
        t = q.shape[1]
        past_k, past_v = seg.cache.get(blk.i)
        if past_k is not None:
            k_all, v_all = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        else:
            k_all, v_all = k, v
        mask = None
        if seg.encoder:
            pos = torch.arange(start, start + t, device=q.device)
            kpos = torch.arange(start - (k_all.shape[1] - t), start + t, device=q.device)
            mask = kpos[None, :] <= pos[:, None]
            if blk.geo.sliding:
                mask &= kpos[None, :] > pos[:, None] - self.m.spec.sliding_window
            # a first chunk's K/V are views into the whole batch's tensors: keep copies instead
            seg.cache.store(blk.i, k_all if past_k is not None else k_all.clone(),
                            v_all if past_k is not None else v_all.clone())
        if q.device.type == "cuda" and q.shape[0] != k_all.shape[0]:
            from .model import grouped_query_attention

            o = grouped_query_attention(q, k_all, v_all, mask)
        else:
            o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=1.0,
                                               enable_gqa=q.shape[0] != k_all.shape[0])
        return o.transpose(0, 1).reshape(t, -1)

    # ---- mixture of experts -----------------------------------------------------------------
    def _moe(self, blk: Block, r: torch.Tensor, rows: _Rows) -> torch.Tensor:
        m, s = self.m, self.m.spec
        z = blk.norm(r, None) * blk.w(blk.ffn_gate_inp_scale) * s.embedding_length ** -0.5
        probs = torch.softmax(self._lin(blk.ffn_gate_inp, z, rows), dim=-1, dtype=torch.float32)
        top_w, top_i = torch.topk(probs, s.expert_used_count, dim=-1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        down_scale = blk.w(blk.ffn_down_exps_scale).float()
        u = blk.norm(r, blk.pre_ffw_norm_2)
        ex = m.expert_executor
        if ex is not None and ex.offloaded(blk.i):
            scaled = top_w * down_scale[top_i]
            return torch.cat([ex.moe(blk.i, u[a:b], top_i[a:b], scaled[a:b]) for a, b in rows.bounds])
        w, dev = m.weights, m.device
        if not self.shared:
            return torch.cat([m.ops.experts(blk.i, u[a:b], top_i[a:b], top_w[a:b], down_scale,
                                            lambda name: w.raw(name, dev)) for a, b in rows.bounds])
        return self._grouped_experts(blk.i, u, top_i, top_w * down_scale[top_i], rows)

    def _grouped_experts(self, layer: int, u: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor,
                         rows: _Rows) -> torch.Tensor:
        """engine.model.grouped_experts for every segment at once: the sort key is (expert,
        segment), so each (expert, segment) run holds exactly the rows, in the order, that the
        segment's own grouped_experts gives that expert; each expert is dequantized once."""
        m = self.m
        n_seg, k = len(rows.bounds), top_i.shape[1]
        seg_of_row = torch.cat([torch.full((b - a,), i, dtype=torch.long) for i, (a, b) in enumerate(rows.bounds)])
        key = top_i.reshape(-1) * n_seg + seg_of_row.to(top_i.device).repeat_interleave(k)
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=m.spec.expert_count * n_seg).tolist()
        token = order // k
        weight = top_w.reshape(-1)[order]
        slots = torch.empty(key.shape[0], u.shape[1], dtype=u.dtype, device=u.device)
        starts, at = [], 0
        for c in counts:
            starts.append(at)
            at += c
        jobs = []
        for e in range(m.spec.expert_count):
            runs = [counts[e * n_seg + i] for i in range(n_seg)]
            if any(runs):
                jobs.append((e, starts[e * n_seg], runs))
        *gate_up, down = m.weights.expert_names(layer)

        def run(part: list[tuple[int, int, list[int]]]) -> None:
            for e, first, runs in part:
                # expert e's rows of every segment lie together, segment after segment; each
                # segment's product runs on its own rows, exactly as its grouped_experts would
                total = sum(runs)
                pick = slice(first, first + total)
                x = u[token[pick]]
                bounds = _Rows([c for c in runs if c])
                gu = [_DequantizedWeight(m.weights.raw(name, u.device)[e], m.weights.info(name).qtype, x)
                      for name in gate_up]
                ys = [bounds.linear(w, x) for w in gu]
                if len(ys) == 1:  # fused: gate rows first
                    f = ys[0].shape[1] // 2
                    gate, up = ys[0][:, :f], ys[0][:, f:]
                else:
                    gate, up = ys
                a = bounds.per_segment(lambda g: F.gelu(g, approximate="tanh"), gate) * up
                dn = _DequantizedWeight(m.weights.raw(down, u.device)[e], m.weights.info(down).qtype, a)
                out = bounds.linear(dn, a) * weight[pick, None]
                slots[order[pick]] = out.to(u.dtype)  # jobs write disjoint rows

        # shared out among worker threads exactly as grouped_experts does (by expert)
        workers = cpu_expert_workers(u.device)
        if workers <= 1 or len(jobs) < 2:
            run(jobs)
        else:
            list(_expert_pool(workers).map(run, [jobs[i::workers] for i in range(workers)]))
        return slots.view(u.shape[0], k, -1).sum(1)

    # ---- vocabulary pass --------------------------------------------------------------------
    def _vocab_pass(self, h: torch.Tensor, temps: list[float | None], rows: _Rows) -> list[SegmentOutput]:
        """DiffusionGemmaModel._vocab_pass per decoder segment (logits and the next soft
        embedding), the embedding table read chunk by chunk once for all of them."""
        m = self.m
        x = rms_norm(h, m.w(m.output_norm), m.eps)
        if not self.shared:
            outs = []
            for (a, b), t in zip(rows.bounds, temps):
                logits, soft = m.ops.vocab_pass(x[a:b], t)
                outs.append(SegmentOutput(logits, soft.to(m.dtype) * m.embed_scale()))
            return outs
        dev = m.device
        out = torch.empty(rows.n, m.vocab, dtype=torch.float32, device=dev)
        cap = m.spec.final_logit_softcapping
        # each row divided by its own segment's temperature: the same division as by a 0-dim tensor
        temp = torch.cat([torch.full((b - a, 1), t, dtype=torch.float32) for (a, b), t in zip(rows.bounds, temps)])
        temp = temp.to(dev)
        soft = torch.zeros(rows.n, m.spec.embedding_length, dtype=torch.float32, device=dev)
        run_max = torch.full((rows.n, 1), -torch.inf, device=dev)
        run_sum = torch.zeros(rows.n, 1, device=dev)
        for s in range(0, m.vocab, m.vocab_chunk):
            e = min(s + m.vocab_chunk, m.vocab)
            table = m.weights.row_range(m.token_embd, s, e, dev, m.dtype)
            chunk = out[:, s:e]
            for a, b in rows.bounds:
                chunk[a:b].copy_(x[a:b] @ table.T)
            torch.tanh(chunk.div_(cap), out=chunk).mul_(cap)
            z = chunk / temp
            new_max = torch.maximum(run_max, z.amax(-1, keepdim=True))
            rescale = torch.exp(run_max - new_max)
            p = torch.exp(z - new_max)
            run_sum = run_sum * rescale + p.sum(-1, keepdim=True)
            p = p.to(m.dtype)
            soft = soft * rescale + rows.per_segment(lambda part, t=table: part @ t, p).float()
            run_max = new_max
        soft = (soft / run_sum).to(m.dtype) * m.embed_scale()
        return [SegmentOutput(out[a:b], soft[a:b]) for a, b in rows.bounds]
