"""engine.imatrix_collect against transformers: the same calibration passes run through the transformers
model with forward pre-hooks on its projections and expert blocks must give the same sums of squared
inputs and the same row counts; collecting changes no logit; offloaded experts are collected too; the
file is llama.cpp's GGUF imatrix, read back by our loader and handed to llama_model_quantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import imatrix_collect as ic
from engine.model import DiffusionGemmaModel
from gguf_tools.arch import ArchSpec
from gguf_tools.imatrix import load_imatrix
from gguf_tools.names import expected_tensors

CANVAS, PROMPT = 16, 20

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers float32 model, spec, its F32 GGUF) for one tiny model."""
    from gguf_tools.convert import convert
    from tests.tiny import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("imatrix")
    model = make_tiny_checkpoint(d / "ckpt", dtype=torch.float32, canvas_length=CANVAS).eval()
    f32, _ = convert(d / "ckpt", d / "tiny-F32.gguf", "F32")
    return model, ArchSpec.from_hf_config(model.config.to_dict()), f32


def samples(n: int = 2, seed: int = 99) -> list[ic.Sample]:
    g = torch.Generator().manual_seed(seed)
    return [ic.Sample(torch.randint(0, 512, (PROMPT,), generator=g).tolist(),
                      torch.randint(0, 512, (CANVAS,), generator=g).tolist()) for _ in range(n)]


class HFObserver:
    """Sums of squared inputs taken inside transformers, by GGUF name."""

    def __init__(self, model, spec: ArchSpec):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.active = False
        self.handles = []
        n_exp = spec.expert_count
        for e in expected_tensors(spec):
            if e.source is None or not e.name.endswith(".weight") or len(e.shape) < 2 or e.name == "token_embd.weight":
                continue
            if "_exps." in e.name:
                if "gate_up" in e.name:
                    self._hook_experts(model, e.source.rsplit(".", 1)[0], e.block, n_exp)
                continue
            for path in self._mirrors(e.source.removesuffix(".weight")):
                mod = _submodule(model, path)
                if mod is not None:
                    self.handles.append(mod.register_forward_pre_hook(self._dense(e.name)))

    @staticmethod
    def _mirrors(path: str) -> list[str]:
        enc = path.replace("model.decoder.layers.", "model.encoder.language_model.layers.")
        return [path] if enc == path else [path, enc]

    def _add(self, name: str, x: torch.Tensor, row: int = 0, n_mat: int = 1) -> None:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, x.shape[-1]))
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        x = x.reshape(-1, x.shape[-1]).double()
        self.sums[name][row] += x.pow(2).sum(0).numpy()
        self.counts[name][row] += x.shape[0]

    def _dense(self, name: str):
        def hook(mod, args):
            # a canvas's first step has no self-conditioning: transformers runs the MLP on zeros, the
            # engine skips it (its output is exactly zero), so those rows are not inputs to collect
            if self.active and not (name.startswith("self_cond_") and not args[0].any()):
                self._add(name, args[0])
        return hook

    def _hook_experts(self, model, path: str, block: int, n_exp: int) -> None:
        def hook(mod, args):
            if not self.active:
                return
            h, top_i = args[0], args[1]
            for e in range(n_exp):
                rows = h[(top_i == e).any(-1)]
                if rows.shape[0] == 0:
                    continue
                gate, up = torch.nn.functional.linear(rows, mod.gate_up_proj[e]).chunk(2, dim=-1)
                self._add(f"blk.{block}.ffn_gate_up_exps.weight", rows, e, n_exp)
                self._add(f"blk.{block}.ffn_down_exps.weight", mod.act_fn(gate) * up, e, n_exp)

        for p in self._mirrors(path):
            mod = _submodule(model, p)
            if mod is not None:
                self.handles.append(mod.register_forward_pre_hook(hook))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@torch.no_grad()
def hf_collect(model, spec: ArchSpec, items: list[ic.Sample], mode: str, seed: int) -> HFObserver:
    """The passes of engine.imatrix_collect.collect, written out against transformers."""
    from tests.engine.test_forward import hf_cache, hf_decoder_logits, hf_encoder_logits

    obs = HFObserver(model, spec)
    g = torch.Generator().manual_seed(seed)
    t_min, t_max = spec.sampler.t_min, spec.sampler.t_max
    try:
        for s in items:
            cache = hf_cache(model)
            obs.active = mode != "diffusion"
            hf_encoder_logits(model, torch.tensor(s.context), cache)
            if mode == "causal":
                hf_encoder_logits(model, torch.tensor(s.canvas), cache)
                continue
            obs.active = True
            clean = torch.tensor(s.canvas)
            u = torch.rand(clean.shape[0], generator=g)
            noise = torch.randint(0, spec.vocab_size, clean.shape, generator=g)
            prev = None
            for level in ic.NOISE_LEVELS:
                logits = hf_decoder_logits(model, torch.where(u < level, noise, clean), cache, prev)
                prev = logits / (t_min + (t_max - t_min) * level)
            obs.active = mode == "both"
            hf_encoder_logits(model, clean, cache)
    finally:
        obs.close()
    return obs


@pytest.mark.parametrize("mode", ic.MODES)
def test_sums_and_counts_match_transformers(tiny, mode):
    model, spec, f32 = tiny
    ours = ic.collect(DiffusionGemmaModel(f32), samples(), mode, seed=5)
    theirs = hf_collect(model, spec, samples(), mode, seed=5)
    entries = ours.entries()
    assert set(entries) == set(theirs.sums)
    assert ("self_cond_gate.weight" in entries) == (mode != "causal")
    for name, (sums, counts) in entries.items():
        np.testing.assert_array_equal(counts, theirs.counts[name], err_msg=name)
        np.testing.assert_allclose(sums, theirs.sums[name], rtol=2e-4, atol=1e-6 * theirs.sums[name].max(),
                                   err_msg=name)
    assert ours.chunks == 2


def test_collecting_changes_no_logit(tiny):
    _, _, f32 = tiny
    m = DiffusionGemmaModel(f32)
    s = samples(1)[0]

    def logits() -> torch.Tensor:
        cache = m.new_cache()
        m.encode(torch.tensor(s.context), cache)
        return m.decode(torch.tensor(s.canvas), cache)

    before = logits()
    ic.collect(m, samples(1), "both")
    assert torch.equal(before, logits())
    assert type(m.ops).__name__ == "TorchOps" and m.weights.observer is None


def test_offloaded_experts_are_collected_the_same(tiny):
    """CPU-to-CPU offload (the expert executor of engine/experts.py) sees the same expert inputs."""
    from engine.experts import attach_plan, detach
    from engine.placement import build_rules, plan_placement, sizes_from_gguf

    _, _, f32 = tiny
    resident = ic.collect(DiffusionGemmaModel(f32), samples(), "both", seed=5).entries()
    m = DiffusionGemmaModel(f32)
    spec, sizes, _ = sizes_from_gguf(f32)
    plan = plan_placement(spec, sizes, ctx=64, vram_budget=None, dtype="f32", rules=build_rules(cpu_moe=True),
                          offload_mode="cpu")
    attach_plan(m, plan)
    assert m.expert_executor is not None and m.expert_executor.offloaded(0)
    try:
        offloaded = ic.collect(m, samples(), "both", seed=5).entries()
    finally:
        detach(m)
    assert set(offloaded) == set(resident)
    for name, (sums, counts) in resident.items():
        np.testing.assert_array_equal(offloaded[name][1], counts, err_msg=name)
        np.testing.assert_allclose(offloaded[name][0], sums, rtol=1e-5, err_msg=name)


def test_written_file_reads_back(tiny, tmp_path):
    _, _, f32 = tiny
    stats = ic.collect(DiffusionGemmaModel(f32), samples(), "both", seed=5)
    out = ic.write(stats, tmp_path / "im.gguf", "unit-test", chunk_size=PROMPT + CANVAS)
    im = load_imatrix(out)
    assert im.datasets == ["unit-test"] and im.chunk_count == 2 and im.chunk_size == PROMPT + CANVAS
    for name, (sums, counts) in stats.entries().items():
        expect = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1.0).astype(np.float32)
        np.testing.assert_allclose(im.entries[name], expect.reshape(-1), rtol=1e-6, err_msg=name)
    assert not list(tmp_path.glob("*.partial"))


def test_bad_mode_and_short_text(tiny):
    _, _, f32 = tiny
    m = DiffusionGemmaModel(f32)
    with pytest.raises(ic.EngineError, match="--mode"):
        ic.collect(m, samples(1), "sideways")
    assert Path(f32).is_file()


# ---- the command and the file, read back by llama.cpp ----------------------------------------------

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40).strip()


def test_cli_writes_an_imatrix_and_refuses_bad_input(tiny_gguf, tmp_path):
    from tests.cli_helpers import invoke, one_line_error

    data = tmp_path / "calib.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "im.gguf"
    r = invoke("imatrix", tiny_gguf, "-o", out, "--data", data, "--ctx", 48, "--chunks", 2, "--mode", "diffusion",
               "--threads", 1)
    assert r.exit_code == 0, r.output
    im = load_imatrix(out)
    assert im.datasets == ["calib.txt"] and im.chunk_count == 2 and im.chunk_size == 48
    assert "self_cond_gate.weight" in im.entries and "blk.0.ffn_gate_up_exps.weight" in im.entries
    bad = [(("--mode", "sideways"), "--mode"), (("--chunks", 0), "--chunks"), (("--ctx", 8), "--ctx 8"),
           (("--data", tmp_path / "missing.txt"), "no such file"), ((), "--data TEXT_FILE is needed")]
    for extra, needle in bad:
        target = tmp_path / "bad.gguf"
        args = ("--data", data, *extra) if extra and extra[0] != "--data" else extra
        one_line_error(invoke("imatrix", tiny_gguf, "-o", target, *args), needle)
        assert not target.exists()
    one_line_error(invoke("imatrix", tiny_gguf, "-o", tiny_gguf, "--data", data), "is the model")


def test_llama_quantize_reads_our_imatrix(tmp_path):
    """An imatrix collected from the diffusion-gemma file: read with gguf-py (not our loader) and
    normalised as tools/quantize does, llama_model_quantize gives the gemma4 copy the same bytes that
    `quantize --imatrix` gives it from our loader."""
    from gguf import GGUFReader

    from gguf_tools import convert as conv
    from gguf_tools.arch import GEMMA4_ARCH
    from tests.gguf_tools import test_llama_quantize_parity as parity

    tiny = parity.Tiny(tmp_path, "moe8")
    dg, _ = conv.convert(tiny.src, tmp_path / "dg-BF16.gguf", "BF16")
    stats = ic.collect(DiffusionGemmaModel(dg), samples(3), "both", seed=1)
    path = ic.write(stats, tmp_path / "dg.imatrix.gguf", "unit-test", chunk_size=PROMPT + CANVAS)
    r = GGUFReader(path)
    raw = {}
    for t in r.tensors:
        name, _, kind = t.name.rpartition(".")
        raw.setdefault(name, {})[kind] = np.asarray(t.data, dtype=np.float32)
    read = {n: (v["in_sum2"].reshape(v["counts"].size, -1), v["counts"].reshape(-1)) for n, v in raw.items()}
    assert set(read) == set(stats.entries())
    blk = {n: v for n, v in read.items() if n.startswith("blk.")}
    ref = tmp_path / "llama.gguf"
    im = load_imatrix(path)
    parity.llama_quantize(tiny.bf16, ref, "Q4_K_M", parity.normalised(blk), kv=parity.imatrix_kv(path, im))
    ours, _ = conv.convert(tiny.src, tmp_path / "ours.gguf", "Q4_K_M", arch=GEMMA4_ARCH, imatrix=im)
    parity.assert_same_file(ours, ref)


def test_quantize_refuses_an_imatrix_of_another_model(tiny_ckpt, tiny_gguf, tmp_path):
    """Names the model does not have, or widths that differ: one line, before any output."""
    from gguf_tools.imatrix import save_gguf_imatrix
    from tests.cli_helpers import invoke, one_line_error

    stats = ic.collect(DiffusionGemmaModel(tiny_gguf), samples(1), "causal").entries()
    stray = save_gguf_imatrix(tmp_path / "stray.gguf", {**stats, "blk.99.attn_q.weight": stats["blk.0.attn_q.weight"]})
    sums, counts = stats["blk.0.attn_q.weight"]
    narrow = save_gguf_imatrix(tmp_path / "narrow.gguf", {**stats, "blk.0.attn_q.weight": (sums[:, :32], counts)})
    nan = save_gguf_imatrix(tmp_path / "nan.gguf", {**stats, "blk.0.attn_q.weight": (sums * np.nan, counts)})
    out = tmp_path / "q.gguf"
    for im, needle in ((stray, "blk.99.attn_q.weight"), (narrow, "blk.0.attn_q.weight"), (nan, "non-finite")):
        one_line_error(invoke("quantize", tiny_ckpt[0], "--type", "Q4_K_M", "--imatrix", im, "-o", out), needle)
        assert not out.exists()
