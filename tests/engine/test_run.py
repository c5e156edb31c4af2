"""`diffgemma run` and `diffgemma logits` end to end on tiny converted models, and their bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as gguf_quantize

from engine.model import DiffusionGemmaModel
from engine.run import RunOptions, run_prompt
from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from tests.cli_helpers import invoke


def one_line_error(result, *needles):
    assert result.exit_code not in (0, None), result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for n in needles:
        assert n in err, err


def test_run_is_reproducible_and_reports_figures(tiny_gguf):
    args = ("run", tiny_gguf, "Sort 3 1 2", "--max-new-tokens", "40", "--steps", "6", "--json")
    a = invoke(*args, "--seed", "5")
    b = invoke(*args, "--seed", "5")
    c = invoke(*args, "--seed", "6")
    assert a.exit_code == 0, a.output
    ja, jb, jc = (json.loads(r.stdout) for r in (a, b, c))
    assert ja["token_ids"] == jb["token_ids"] and ja["text"] == jb["text"]
    assert ja["token_ids"] != jc["token_ids"]
    assert 0 < len(ja["token_ids"]) <= 40
    assert 1 <= len(ja["steps_per_canvas"]) <= 3 and all(1 <= s <= 6 for s in ja["steps_per_canvas"])
    assert ja["prompt_tokens"] > 5
    assert ja["prefill_tokens_per_s"] > 0 and ja["generated_tokens_per_s"] > 0 and ja["peak_memory_bytes"] > 0


def test_run_streams_canvas_by_canvas(tiny_gguf):
    chunks: list[str] = []
    steps: list[tuple[int, int]] = []
    result = run_prompt(tiny_gguf, "hello", RunOptions(max_new_tokens=48, steps=4, seed=1, raw=True),
                        on_text=chunks.append, on_step=lambda i: steps.append((i.canvas_index, i.step)))
    assert len(chunks) == len(result.steps_per_canvas)
    assert "".join(chunks) == result.text
    assert len(steps) == sum(result.steps_per_canvas)
    assert steps[0] == (0, 1)


def test_run_text_mode_prints_text_and_summary(tiny_gguf):
    r = invoke("run", tiny_gguf, "hi", "--max-new-tokens", "16", "--steps", "3", "--think")
    assert r.exit_code == 0, r.output
    assert "tokens" in r.stderr and "canvas" in r.stderr


def test_run_with_the_embedded_default(tmp_path):
    env = {"DIFFGEMMA_CACHE": str(tmp_path)}
    r = invoke("run", "Count to five.", "--max-new-tokens", "8", "--steps", "2", "--json", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"].startswith(str(tmp_path))
    assert len(list(tmp_path.glob("*.gguf"))) == 1 and not list(tmp_path.glob(".build-*"))


def test_logits_command_equals_the_engine(tiny_gguf, tmp_path):
    m = DiffusionGemmaModel(tiny_gguf)
    tokens, canvas = [2, 17, 33, 40, 41], [5, 9, 11, 12]
    r = invoke("logits", tiny_gguf, "--tokens", ",".join(map(str, tokens)), "--out", tmp_path / "enc.npy")
    assert r.exit_code == 0, r.output
    enc = np.load(tmp_path / "enc.npy")
    want = m.encode(torch.tensor(tokens), m.new_cache(), return_logits=True).numpy()
    np.testing.assert_allclose(enc, want, rtol=0, atol=1e-5)
    assert enc.shape == (5, m.vocab_size)

    sc = np.random.default_rng(0).standard_normal((4, m.vocab_size)).astype(np.float32)
    np.save(tmp_path / "sc.npy", sc)
    r = invoke("logits", tiny_gguf, "--tokens", "2,17,33", "--canvas", ",".join(map(str, canvas)),
               "--self-cond", tmp_path / "sc.npy", "--out", tmp_path / "dec.npy")
    assert r.exit_code == 0, r.output
    cache = m.new_cache()
    m.encode(torch.tensor([2, 17, 33]), cache)
    want = m.decode(torch.tensor(canvas), cache, torch.from_numpy(sc)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "dec.npy"), want, rtol=0, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------------

def copy_gguf(src: Path, dst: Path, drop: str | None = None, requantize: dict[str, Q] | None = None) -> Path:
    """Rewrite a GGUF with gguf-py, dropping one tensor or storing some in another type."""
    r = GGUFReader(src)
    w = GGUFWriter(dst, str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vt = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vt == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        if t.name == drop:
            continue
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if requantize and t.name in requantize:
            from gguf.quants import dequantize

            qt = requantize[t.name]
            values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            if qt == Q.Q8_1:  # gguf-py has no Q8_1 quantizer: the bytes only need the right size
                block, size = GGML_QUANT_SIZES[qt]
                data = np.zeros((*shape[:-1], shape[-1] // block * size), np.uint8)
            else:
                data = gguf_quantize(values, qt)
            w.add_tensor(t.name, data, raw_dtype=qt)
        else:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # reader shapes are byte shapes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_another_architecture_is_refused(tiny_ckpt, tmp_path):
    g4, _ = conv.convert(tiny_ckpt[0], tmp_path / "g4.gguf", "BF16", arch=GEMMA4_ARCH)
    one_line_error(invoke("run", g4, "hi"), "gemma4", "diffusion-gemma")
    one_line_error(invoke("logits", g4, "--tokens", "1,2", "--out", tmp_path / "x.npy"), "gemma4")
    assert not (tmp_path / "x.npy").exists()


def test_missing_tensor_is_named(tiny_gguf, tmp_path):
    bad = copy_gguf(tiny_gguf, tmp_path / "missing.gguf", drop="blk.1.ffn_down_exps.weight")
    one_line_error(invoke("run", bad, "hi"), "blk.1.ffn_down_exps.weight")


def test_unsupported_tensor_type_is_named(tiny_gguf, tmp_path):
    # Q8_1 is a valid ggml type (an activation format) that no model file should hold
    bad = copy_gguf(tiny_gguf, tmp_path / "q81.gguf", requantize={"blk.0.attn_q.weight": Q.Q8_1})
    one_line_error(invoke("run", bad, "hi"), "blk.0.attn_q.weight", "Q8_1")


def test_prompt_longer_than_context(tiny_gguf):
    one_line_error(invoke("run", tiny_gguf, "word " * 1200, "--raw"), "context length")


def test_token_ids_out_of_range(tiny_gguf, tmp_path):
    one_line_error(invoke("logits", tiny_gguf, "--tokens", "1,512", "--out", tmp_path / "x.npy"), "512")
    one_line_error(invoke("logits", tiny_gguf, "--tokens", "1,2", "--canvas", "-1", "--out", tmp_path / "x.npy"),
                   "--canvas")
    np.save(tmp_path / "sc.npy", np.zeros((3, 7), np.float32))
    one_line_error(invoke("logits", tiny_gguf, "--tokens", "1,2", "--canvas", "4,5", "--self-cond",
                          tmp_path / "sc.npy", "--out", tmp_path / "x.npy"), "--self-cond")
    assert not (tmp_path / "x.npy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_gguf):
    one_line_error(invoke("run", tiny_gguf, "hi", "--device", "cuda"), "CUDA")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    one_line_error(invoke("run", bad, "hi"), "junk.gguf")


def test_fused_step_equals_separate_passes(tiny_gguf):
    """decode_step reads the embedding table once for the logits and the next step's soft embedding;
    it must compute what decode + soft_embedding compute, and generation must not change."""
    from engine import sampler as S
    from engine.generate import ModelRunner, generate

    m = DiffusionGemmaModel(tiny_gguf, vocab_chunk=100)  # several chunks: the online softmax matters
    cache = m.new_cache()
    m.encode(torch.tensor([2, 105, 30, 31, 106]), cache)
    canvas = torch.randint(0, m.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    logits, soft = m.decode_step(canvas, cache, None, 0.7)
    torch.testing.assert_close(logits, m.decode(canvas, cache), rtol=0, atol=0)
    torch.testing.assert_close(soft, m.soft_embedding(S.scale_logits(logits, 0.7)), rtol=1e-5, atol=1e-6)

    class Unfused(ModelRunner):
        decode_scaled = None

    runs = [generate(R(m), torch.tensor([2, 105, 30, 31, 106]), max_new_tokens=40, steps=6, eos_ids=(1,),
                     pad_id=0, generator=torch.Generator().manual_seed(4)).tokens for R in (ModelRunner, Unfused)]
    assert torch.equal(runs[0], runs[1])


# ---- what run prints: the answer's token count, the prompt as prefilled, no GPU figures on the CPU ----

def test_statistics_count_the_answer_and_cpu_json_has_no_gpu_fields(tiny_gguf):
    from engine.tokenizer import GGUFTokenizer
    from gguf_tools.reader import GGUFFile

    args = ("run", tiny_gguf, "Sort 3 1 2", "--max-new-tokens", "40", "--steps", "6", "--seed", "5", "--device", "cpu")
    j = json.loads(invoke(*args, "--json").stdout)
    eos = set(GGUFTokenizer.from_kv(GGUFFile(tiny_gguf).kv).eos_ids)
    answer = next((n for n, t in enumerate(j["token_ids"]) if t in eos), len(j["token_ids"]))
    assert j["answer_tokens"] == answer
    assert "vram_budget_bytes" not in j["placement"] and "planned_gpu_bytes" not in j["placement"]
    text = invoke(*args)
    assert text.exit_code == 0, text.output
    assert text.stderr.splitlines()[-1].startswith(f"[{answer} tokens, ")


def test_show_prompt_and_tokenize_give_the_ids_run_prefills(tiny_gguf):
    from engine.tokenizer import GGUFTokenizer
    from gguf_tools.reader import GGUFFile

    tok = GGUFTokenizer.from_kv(GGUFFile(tiny_gguf).kv)
    want = tok.apply_chat([{"role": "user", "content": "Sort 3 1 2"}])
    r = invoke("run", tiny_gguf, "Sort 3 1 2", "--max-new-tokens", "8", "--steps", "2", "--json", "--show-prompt")
    j = json.loads(r.stdout)
    assert j["prompt_ids"] == want and j["prompt_tokens"] == len(want)
    assert tok.encode(j["prompt_text"]) == want  # the text shown is the text prefilled
    shown = invoke("run", tiny_gguf, "Sort 3 1 2", "--max-new-tokens", "8", "--steps", "2", "--show-prompt")
    assert f"ids: {','.join(map(str, want))}" in shown.stderr and j["prompt_text"] in shown.stderr
    ids = invoke("tokenize", tiny_gguf, "Sort 3 1 2")
    assert ids.exit_code == 0 and ids.stdout.strip() == ",".join(map(str, want))
    raw = json.loads(invoke("tokenize", tiny_gguf, "Sort 3 1 2", "--raw", "--json").stdout)
    assert raw["ids"] == tok.raw("Sort 3 1 2") and raw["tokens"] == [tok.tokens[i] for i in raw["ids"]]
    # the ids go straight into logits --tokens
    out = invoke("logits", tiny_gguf, "--tokens", ids.stdout.strip(), "--out", tiny_gguf.parent / "enc.npy")
    assert out.exit_code == 0 and np.load(tiny_gguf.parent / "enc.npy").shape[0] == len(want)
    (tiny_gguf.parent / "enc.npy").unlink()


def test_an_empty_answer_is_said(tiny_gguf, monkeypatch):
    import engine.run as run_mod

    real = run_mod.run_prompt

    def silent(*a, **k):
        r = real(*a, **k)
        r.text, r.answer_tokens = "", 0
        return r

    monkeypatch.setattr(run_mod, "run_prompt", silent)
    r = invoke("run", tiny_gguf, "hi", "--max-new-tokens", "8", "--steps", "2")
    assert r.exit_code == 0 and "note: the answer is empty" in r.stderr
