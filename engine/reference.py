"""The DiffusionGemma forward pass in float64 NumPy, written to be read, not to be fast.

This is the test oracle for engine/model.py. It shares no code with it: weights are dequantized
with gguf-py's own `gguf.quants.dequantize`, the whole sequence is processed at once with explicit
masks, and every step of arch notes §3 and §5.3-5.4 appears once, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from gguf_tools.arch import ArchSpec
from gguf_tools.reader import GGUFFile


@dataclass
class RefWeights:
    spec: ArchSpec
    t: dict[str, np.ndarray]  # GGUF name -> float64 array in NumPy shape

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.t:
            raise ValueError(f"missing required tensor {name!r}")
        return self.t[name]


def load_reference_weights(src: str | Path | GGUFFile | RefWeights) -> RefWeights:
    """Every tensor dequantized to float64, with the layout variants folded into one naming:
    fused ffn_gate_up_exps, self_cond_pre_norm, and one enc_layer_output_scale per layer."""
    if isinstance(src, RefWeights):
        return src
    f = src if isinstance(src, GGUFFile) else GGUFFile(getattr(src, "path", src))
    t = {name: dequantize(np.asarray(info.data), info.qtype).reshape(info.shape).astype(np.float64)
         for name, info in f.tensors.items()}
    spec = f.spec()
    if "self_cond_norm.weight" in t and "self_cond_pre_norm.weight" not in t:
        t["self_cond_pre_norm.weight"] = t.pop("self_cond_norm.weight")
    for i in range(spec.block_count):
        p = f"blk.{i}."
        if p + "ffn_gate_up_exps.weight" not in t and p + "ffn_gate_exps.weight" in t:
            t[p + "ffn_gate_up_exps.weight"] = np.concatenate(
                [t.pop(p + "ffn_gate_exps.weight"), t.pop(p + "ffn_up_exps.weight")], axis=1)
        if p + "enc_layer_output_scale.weight" not in t and p + "layer_output_scale.weight" in t:
            t[p + "enc_layer_output_scale.weight"] = t[p + "layer_output_scale.weight"]
    return RefWeights(spec, t)


# ---- building blocks ---------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gated_mlp(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    return (gelu_tanh(x @ gate.T) * (x @ up.T)) @ down.T


def rope(x: np.ndarray, positions: np.ndarray, base: float, dims: int, rotated_pairs: int) -> np.ndarray:
    """x [T, heads, dims]. Pair i with i + dims/2; pairs at or beyond `rotated_pairs` have frequency 0."""
    half = dims // 2
    freq = np.zeros(half)
    i = np.arange(rotated_pairs)
    freq[:rotated_pairs] = base ** (-2.0 * i / dims)
    angle = positions[:, None] * freq[None, :]  # [T, half]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def attention_inputs(W: RefWeights, i: int, x: np.ndarray, positions: np.ndarray):
    """q [Hq, T, d], k and v [Hkv, T, d] for normalised layer input x [T, H]."""
    g, eps, p = W.spec.layer(i), W.spec.layer_norm_rms_epsilon, f"blk.{i}."
    T, d = x.shape[0], g.head_dim
    q = rms_norm((x @ W[p + "attn_q.weight"].T).reshape(T, -1, d), W[p + "attn_q_norm.weight"], eps)
    k_raw = (x @ W[p + "attn_k.weight"].T).reshape(T, -1, d)
    v_raw = k_raw if g.k_eq_v else (x @ W[p + "attn_v.weight"].T).reshape(T, -1, d)
    k = rms_norm(k_raw, W[p + "attn_k_norm.weight"], eps)
    v = rms_norm(v_raw, None, eps)
    q = rope(q, positions, g.rope_base, g.rope_dims, g.rotated_pairs)
    k = rope(k, positions, g.rope_base, g.rope_dims, g.rotated_pairs)
    return q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, visible: np.ndarray | None) -> np.ndarray:
    """Scale-free GQA attention. visible [Tq, Tk] bool or None (everything visible). -> [Tq, Hq*d]"""
    group = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, group, axis=0), np.repeat(v, group, axis=0)
    scores = q @ k.transpose(0, 2, 1)  # scale 1.0
    if visible is not None:
        scores = np.where(visible[None], scores, -np.inf)
    out = softmax(scores) @ v  # [Hq, Tq, d]
    return out.transpose(1, 0, 2).reshape(q.shape[1], -1)


def moe(W: RefWeights, i: int, r: np.ndarray) -> np.ndarray:
    s, eps, p = W.spec, W.spec.layer_norm_rms_epsilon, f"blk.{i}."
    z = rms_norm(r, None, eps) * W[p + "ffn_gate_inp.scale"] * s.embedding_length ** -0.5
    probs = softmax(z @ W[p + "ffn_gate_inp.weight"].T)  # over all experts
    u = rms_norm(r, W[p + "pre_ffw_norm_2.weight"], eps)
    F = s.expert_feed_forward_length
    out = np.zeros_like(r)
    for t in range(r.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[: s.expert_used_count]
        weights = probs[t, top] / probs[t, top].sum()
        for e, w in zip(top, weights):
            gate_up = W[p + "ffn_gate_up_exps.weight"][e]
            y = gated_mlp(u[t], gate_up[:F], gate_up[F:], W[p + "ffn_down_exps.weight"][e])
            out[t] += w * W[p + "ffn_down_exps.scale"][e] * y
    return out


def layer(W: RefWeights, i: int, h: np.ndarray, positions: np.ndarray, past_k: np.ndarray, past_v: np.ndarray,
          visible: np.ndarray | None, scale_name: str):
    """One layer. Returns (new h, this layer's k, v for the rows of h)."""
    eps, p = W.spec.layer_norm_rms_epsilon, f"blk.{i}."
    q, k, v = attention_inputs(W, i, rms_norm(h, W[p + "attn_norm.weight"], eps), positions)
    a = attend(q, np.concatenate([past_k, k], axis=1), np.concatenate([past_v, v], axis=1), visible)
    h = h + rms_norm(a @ W[p + "attn_output.weight"].T, W[p + "post_attention_norm.weight"], eps)
    dense = gated_mlp(rms_norm(h, W[p + "ffn_norm.weight"], eps), W[p + "ffn_gate.weight"],
                      W[p + "ffn_up.weight"], W[p + "ffn_down.weight"])
    dense = rms_norm(dense, W[p + "post_ffw_norm_1.weight"], eps)
    experts = rms_norm(moe(W, i, h), W[p + "post_ffw_norm_2.weight"], eps)
    h = h + rms_norm(dense + experts, W[p + "post_ffw_norm.weight"], eps)
    return h * W[p + scale_name], k, v


def output_logits(W: RefWeights, h: np.ndarray) -> np.ndarray:
    x = rms_norm(h, W["output_norm.weight"], W.spec.layer_norm_rms_epsilon)
    cap = W.spec.final_logit_softcapping
    return cap * np.tanh((x @ W["token_embd.weight"].T) / cap)


# ---- the two modes ---------------------------------------------------------------------------------

def run_encoder(W: RefWeights, tokens) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Causal pass over the whole sequence at positions 0..P-1. Returns (final h, per-layer (k, v))."""
    s = W.spec
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    P = len(tokens)
    pos = np.arange(P, dtype=np.float64)
    h = W["token_embd.weight"][tokens] * np.sqrt(s.embedding_length)
    causal = pos[None, :] <= pos[:, None]  # [query, key]
    in_window = pos[None, :] > pos[:, None] - s.sliding_window
    kv = []
    for i in range(s.block_count):
        visible = causal & in_window if s.layer(i).sliding else causal
        empty = np.zeros((s.layer(i).n_kv_head, 0, s.layer(i).head_dim))
        h, k, v = layer(W, i, h, pos, empty, empty, visible, "enc_layer_output_scale.weight")
        kv.append((k, v))
    return h, kv


def reference_encoder_logits(src, tokens) -> np.ndarray:
    """[P, V] float64 logits of the encoder at every prompt position."""
    W = load_reference_weights(src)
    h, _ = run_encoder(W, tokens)
    return output_logits(W, h)


def reference_decoder_logits(src, context_tokens, canvas, self_cond=None) -> np.ndarray:
    """[C, V] logits of the canvas that follows `context_tokens`.

    self_cond: the previous step's (temperature-scaled) logits [C, V], or None on a first step.
    """
    W = load_reference_weights(src)
    s, eps = W.spec, W.spec.layer_norm_rms_epsilon
    _, ctx_kv = run_encoder(W, context_tokens)
    P = len(np.asarray(context_tokens).reshape(-1))
    canvas = np.asarray(canvas, dtype=np.int64).reshape(-1)
    E, scale = W["token_embd.weight"], np.sqrt(s.embedding_length)
    h = E[canvas] * scale
    if self_cond is not None:
        soft = softmax(np.asarray(self_cond, dtype=np.float64)) @ E * scale
        soft = rms_norm(soft, W["self_cond_pre_norm.weight"], eps)
        h = h + gated_mlp(soft, W["self_cond_gate.weight"], W["self_cond_up.weight"], W["self_cond_down.weight"])
    h = rms_norm(h, None, eps)
    pos = np.arange(P, P + len(canvas), dtype=np.float64)
    for i in range(s.block_count):
        k, v = ctx_kv[i]
        if s.layer(i).sliding:  # the sliding cache holds the last window-1 context keys
            keep = min(P, s.sliding_window - 1)
            k, v = k[:, P - keep:], v[:, P - keep:]
        h, _, _ = layer(W, i, h, pos, k, v, None, "layer_output_scale.weight")
    return output_logits(W, h)


__all__ = ["RefWeights", "load_reference_weights", "reference_decoder_logits", "reference_encoder_logits",
           "run_encoder"]
