"""`diffgemma quantize --type P` against llama.cpp's own llama_model_quantize, file against file.

llama.cpp (llama-cpp-python 0.3.36) knows gemma4, the backbone of diffusion-gemma, so the oracle runs
in-process on the BF16 gemma4 copy of a tiny checkpoint, exactly as `llama-quantize` would: the
preset's ftype, the normalised imatrix arrays (notes §2.8, §4.1) and the quantize.imatrix.* keys the
CLI adds. Our file, made straight from the checkpoint, must be byte-identical: key order, tensor
order, types and data. Two tiny models: 8 experts (the n_expert == 8 rules) and 16 experts with
n_gqa 4, both with hidden 256 and rows of 96, 80 and 32 values that exercise every fallback.
"""

from __future__ import annotations

import ctypes as C
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

from gguf_tools import convert as conv
from gguf_tools.arch import GEMMA4_ARCH
from gguf_tools.imatrix import load_imatrix, save_gguf_imatrix
from gguf_tools.presets import PresetError, load_preset, parse_override
from gguf_tools.requantize import requantize
from tests.oracles import ggml_lib
from tests.tiny import make_tiny_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")

FTYPES = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q5_K_S": 16, "Q4_K_M": 15, "Q4_K_S": 14, "Q3_K_M": 12,
          "Q2_K": 10, "IQ4_XS": 30, "MXFP4_MOE": 38, "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}
# the default run: one case per rule family; `pytest -m slow` runs every preset on both models
FAST = {("moe8", "Q4_K_M", False), ("moe8", "IQ4_XS", True), ("moe8", "MXFP4_MOE", False),
        ("moe16", "Q4_K_M", True), ("moe16", "Q2_K", False)}

# (name, overrides): 8 experts, n_gqa 2, 4 layers; 16 experts, n_gqa 4, 8 layers (use_more_bits and
# the n/8 rules pick different blocks), narrow attn_output rows (128) and ffn_down rows of 80 (-> F16)
MODELS = {
    "moe8": dict(num_experts=8, top_k_experts=2, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
                 intermediate_size=96, moe_intermediate_size=32,
                 layer_types=["sliding_attention"] * 3 + ["full_attention"]),
    "moe16": dict(num_experts=16, top_k_experts=2, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
                  intermediate_size=80, moe_intermediate_size=32,
                  layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2),
}


def require_writable(preset: str) -> None:
    """Skip (never fake) presets whose quantizers are not in gguf_tools.quants yet."""
    try:
        load_preset(preset)
    except PresetError as e:
        if "cannot be written" in str(e):
            pytest.skip(f"{preset}: {e}")
        raise


# ---- the oracle ----------------------------------------------------------------------------------

@contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(cb, None)
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, C.c_void_p(0))  # llama-cpp-python's own logger


def terminated_array(struct, items: Sequence, fill, end_field: str, end_value, keep: list[object]):
    """A C array of `struct` filled from `items` plus the terminating entry llama.cpp scans for, as
    the pointer its params field takes; `keep` holds it alive until the call returns."""
    arr = (struct * (len(items) + 1))()
    for i, item in enumerate(items):
        fill(arr[i], item)
    setattr(arr[len(items)], end_field, end_value)
    keep.append(arr)
    return C.cast(arr, C.POINTER(struct))


def llama_quantize(inp: Path, out: Path, preset: str, imatrix: dict[str, np.ndarray] | None = None,
                   overrides: Sequence[tuple[str, Q]] = (), pure: bool = False,
                   kv: Sequence[tuple[str, object]] = (), dry_run: bool = False) -> str:
    """llama_model_quantize in-process (what tools/quantize does); returns its log."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[preset]
    p.nthread = 1
    p.pure = pure
    p.dry_run = dry_run
    keep: list[object] = []
    if imatrix is not None:
        values = {n: np.ascontiguousarray(v, dtype=np.float32).reshape(-1) for n, v in sorted(imatrix.items())}
        keep.extend(values.values())

        def fill_imatrix(e, item):
            e.name, e.data, e.size = item[0].encode(), item[1].ctypes.data_as(C.POINTER(C.c_float)), item[1].size
        p.imatrix = terminated_array(llama_cpp.llama_model_imatrix_data, list(values.items()), fill_imatrix,
                                     "name", None, keep)
    if overrides:
        def fill_override(e, item):
            e.pattern, e.type = item[0].encode(), int(item[1])
        p.tt_overrides = terminated_array(llama_cpp.llama_model_tensor_override, overrides, fill_override,
                                          "pattern", None, keep)
    if kv:
        def fill_kv(e, item):
            key, value = item
            e.key = key.encode()
            if isinstance(value, str):
                e.tag, e.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            else:
                e.tag, e.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        p.kv_overrides = terminated_array(llama_cpp.llama_model_kv_override, kv, fill_kv, "key", b"", keep)
    with captured_llama_log() as lines:
        rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), C.byref(p))
    log = "".join(lines)
    assert rc == 0, log[-2000:]
    return log


_LOG_ROW = re.compile(r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), (.*)$")


def llama_dry_run_types(log: str) -> dict[str, str]:
    """Tensor -> type name (ggml spelling, upper-cased) from a dry-run log."""
    out = {}
    for line in log.splitlines():
        m = _LOG_ROW.search(line)
        if m:
            name, src, rest = m.groups()
            tgt = re.search(r"\((\w+)\)\s*$", rest)
            out[name] = (tgt.group(1) if tgt else src).upper()
    return out


def imatrix_kv(path: Path, im) -> list[tuple[str, object]]:
    """The kv overrides tools/quantize adds with --imatrix (file, dataset, entries, chunks)."""
    kv: list[tuple[str, object]] = [("quantize.imatrix.file", str(path))]
    if im.datasets:
        kv.append(("quantize.imatrix.dataset", im.datasets[0]))
    kv.append(("quantize.imatrix.entries_count", len(im.entries)))
    if im.chunk_count > 0:
        kv.append(("quantize.imatrix.chunks_count", im.chunk_count))
    return kv


def normalised(stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """What tools/quantize hands llama_model_quantize for a GGUF imatrix, computed here independently:
    in_sum2 / count per expert in float32, 1.0 for an expert that saw no token."""
    out = {}
    for name, (sums, counts) in stats.items():
        sums = np.asarray(sums, np.float32).reshape(len(counts), -1)
        vals = np.ones_like(sums)
        for j, c in enumerate(counts):
            if c > 0:
                vals[j] = sums[j] / np.float32(c)
        out[name] = vals.reshape(-1)
    return out


def random_stats(gguf_path: Path, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A random imatrix in llama.cpp's layout for every blk.* matrix of the file: 2-D weights one
    matrix, 3-D expert weights one per expert, expert 1 without tokens (count 0)."""
    rng = np.random.default_rng(seed)
    stats = {}
    for name, t in ggml_lib.read_gguf(gguf_path).tensors.items():
        if not name.startswith("blk.") or len(t.shape) < 2 or not name.endswith(".weight") or "_norm" in name \
                or "ffn_gate_inp" in name:
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        counts = rng.integers(16, 2000, n_mat).astype(np.float32)
        if n_mat > 1:
            counts[1] = 0
        sums = (rng.gamma(0.7, 2.0, (n_mat, t.shape[-1])) * counts[:, None]).astype(np.float32)
        stats[name] = (sums, counts)
    return stats


# ---- fixtures -----------------------------------------------------------------------------------

class Tiny:
    def __init__(self, root: Path, key: str):
        self.src = root / f"tiny-{key}"
        make_tiny_checkpoint(self.src, dtype=torch.bfloat16, seed=11, hidden_size=256, vocab_size=512,
                             max_shard_size="2MB", **MODELS[key])
        self.bf16 = conv.convert(self.src, root / f"tiny-{key}-gemma4-BF16.gguf", "BF16", arch=GEMMA4_ARCH)[0]
        self.stats = random_stats(self.bf16, seed=5)
        self.imatrix_path = save_gguf_imatrix(root / f"tiny-{key}.imatrix.gguf", self.stats,
                                              datasets=["tiny-calibration.txt"], chunk_count=7, chunk_size=512)
        self.imatrix = load_imatrix(str(self.imatrix_path))
        self.root = root
        self.key = key


@pytest.fixture(scope="module")
def _tinies() -> dict[str, Tiny]:
    return {}


@pytest.fixture
def tiny(request, _tinies, tmp_path_factory) -> Tiny:
    """Built once per model for the module, whatever order the parametrized tests run in."""
    key = request.param
    if key not in _tinies:
        _tinies[key] = Tiny(tmp_path_factory.mktemp(key), key)
    return _tinies[key]


def per_model(fast: str, *rest: object) -> list:
    """Run on model `fast` by default and on the other one with -m slow (the `tiny` fixture is indirect)."""
    return [pytest.param(m, *rest, marks=() if m == fast else pytest.mark.slow, id="-".join(map(str, (m, *rest))))
            for m in MODELS]


def _oracle(tiny: Tiny, preset: str, with_imatrix: bool, out: Path, **kw) -> Path:
    im = normalised(tiny.stats) if with_imatrix else None
    kv = imatrix_kv(tiny.imatrix_path, tiny.imatrix) if with_imatrix else ()
    llama_quantize(tiny.bf16, out, preset, im, kv=kv, **kw)
    return out


def assert_same_file(ours: Path, ref: Path) -> None:
    a, b = ours.read_bytes(), ref.read_bytes()
    if a == b:
        return
    fa, fb = ggml_lib.read_gguf(ours), ggml_lib.read_gguf(ref)
    assert list(fa.kv) == list(fb.kv), "key order differs"
    assert fa.kv == fb.kv
    assert list(fa.tensors) == list(fb.tensors)
    for n, tb in fb.tensors.items():
        ta = fa.tensors[n]
        assert ta.qtype == tb.qtype, f"{n}: ours {ta.qtype.name}, llama.cpp {tb.qtype.name}"
        assert a[ta.offset: ta.offset + ta.n_bytes] == b[tb.offset: tb.offset + tb.n_bytes], f"{n} ({ta.qtype.name})"
    raise AssertionError("files differ outside the tensors")


CASES = [pytest.param(m, p, im, marks=() if (m, p, im) in FAST else pytest.mark.slow,
                      id=f"{m}-{p}-{'imatrix' if im else 'plain'}")
         for m in MODELS for p in FTYPES for im in (False, True)]


@pytest.mark.parametrize(("tiny", "preset", "with_imatrix"), CASES, indirect=["tiny"])
def test_same_file_as_llama_quantize(tiny, preset, with_imatrix, tmp_path):
    require_writable(preset)
    ref = _oracle(tiny, preset, with_imatrix, tmp_path / "llama.gguf")
    ours, _ = conv.convert(tiny.src, tmp_path / "ours.gguf", preset, arch=GEMMA4_ARCH,
                           imatrix=tiny.imatrix if with_imatrix else None)
    assert_same_file(ours, ref)


@pytest.mark.parametrize("tiny", per_model("moe16"), indirect=True)
def test_overrides_and_pure_as_llama_quantize(tiny, tmp_path):
    """--tensor-type (first match wins; an override skips the attn_v counter) and --pure."""
    require_writable("Q4_K_M")
    texts = [r"blk\.1\.attn_v=q5_0", "FFN_DOWN_EXPS=q8_0", "ffn_down_exps=q4_k", r"attn_q\.=iq4_xs"]
    rules = tuple(parse_override(t) for t in texts)
    ref = tmp_path / "llama.gguf"
    llama_quantize(tiny.bf16, ref, "Q4_K_M", overrides=[(r.pattern, r.type) for r in rules])
    ours, _ = conv.convert(tiny.src, tmp_path / "ours.gguf", "Q4_K_M", arch=GEMMA4_ARCH, overrides=rules)
    assert_same_file(ours, ref)
    ref_pure = tmp_path / "llama-pure.gguf"
    llama_quantize(tiny.bf16, ref_pure, "Q3_K_M", pure=True, overrides=[(r.pattern, r.type) for r in rules[:1]])
    ours_pure, _ = conv.convert(tiny.src, tmp_path / "ours-pure.gguf", "Q3_K_M", arch=GEMMA4_ARCH,
                                overrides=rules[:1], pure=True)
    assert_same_file(ours_pure, ref_pure)


@pytest.mark.parametrize("tiny", per_model("moe8"), indirect=True)
def test_cli_diffusion_gemma_file_gets_the_same_types_and_bytes(tiny, tmp_path):
    """`diffgemma quantize` writes the diffusion-gemma file; every tensor it shares with the gemma4
    copy has llama.cpp's type and bytes, the self-conditioning MLP follows the default rule."""
    import cli

    require_writable("Q4_K_M")
    ref = _oracle(tiny, "Q4_K_M", True, tmp_path / "llama.gguf")
    out = tmp_path / "dg.gguf"
    result = CliRunner().invoke(cli.app, ["quantize", str(tiny.src), "--type", "Q4_K_M", "--imatrix",
                                          str(tiny.imatrix_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    ours, theirs = ggml_lib.read_gguf(out), ggml_lib.read_gguf(ref)
    a, b = out.read_bytes(), ref.read_bytes()
    for n, tb in theirs.tensors.items():
        ta = ours.tensors[n]
        assert ta.qtype == tb.qtype, n
        assert a[ta.offset: ta.offset + ta.n_bytes] == b[tb.offset: tb.offset + tb.n_bytes], n
    extra = set(ours.tensors) - set(theirs.tensors)
    assert {n for n in extra if "enc_layer_output_scale" not in n} == {
        "self_cond_pre_norm.weight", "self_cond_gate.weight", "self_cond_up.weight", "self_cond_down.weight"}
    ffn = MODELS[tiny.key]["intermediate_size"]
    assert ours.tensors["self_cond_gate.weight"].qtype == Q.Q4_K
    assert ours.tensors["self_cond_down.weight"].qtype == (Q.Q5_0 if ffn % 32 == 0 else Q.F16)
    assert ours.kv["general.file_type"] == 15 and ours.kv["quantize.imatrix.entries_count"] == len(tiny.stats)


@pytest.mark.parametrize(("tiny", "preset"), per_model("moe8", "Q4_K_M") + per_model("moe16", "Q8_0"),
                         indirect=["tiny"])
def test_requantize_bf16_gguf_equals_direct_conversion(tiny, preset, tmp_path):
    """BF16 GGUF -> P (CLI) is the file that converting the checkpoint straight to P gives, for the
    diffusion-gemma file; for the gemma4 copy it is also llama-quantize's file."""
    import cli

    require_writable(preset)
    bf16 = conv.convert(tiny.src, tmp_path / "dg-BF16.gguf", "BF16")[0]
    direct = conv.convert(tiny.src, tmp_path / "direct.gguf", preset)[0]
    result = CliRunner().invoke(cli.app, ["quantize", str(bf16), "--type", preset])
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"dg-{preset}.gguf").read_bytes() == direct.read_bytes()
    dry = CliRunner().invoke(cli.app, ["quantize", str(bf16), "--type", preset, "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    direct_plan = conv.plan_conversion(tiny.src, preset)
    assert [(r["name"], r["type"]) for r in planned["tensors"]] == [(t.name, t.qtype.name) for t in direct_plan.tensors]
    ref = tmp_path / "llama.gguf"
    llama_quantize(tiny.bf16, ref, preset)
    ours, _ = requantize(tiny.bf16, tmp_path / "rq.gguf", preset)
    assert_same_file(ours, ref)


def test_requantize_refuses_bad_input(tiny_ckpt, tmp_path):
    import cli

    run = lambda *a: CliRunner().invoke(cli.app, ["quantize", *map(str, a)])  # noqa: E731
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(40))
    q8 = conv.convert(tiny_ckpt[0], tmp_path / "m-Q8_0.gguf", "Q8_0")[0]
    for args, needle in (((bad, "--type", "Q8_0"), "bad.gguf"),
                         ((q8, "--type", "Q4_K_M"), "requantizing from a quantized type is disabled"),
                         ((q8, "--type", "Q8_0", "-o", q8), "is the input file"),
                         ((q8, "--type", "Q4_K_M", "--tensor-type", "attn_v"), "REGEX=TYPE")):
        result = run(*args)
        assert result.exit_code == 1, result.output
        err = result.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err, err
    assert not (tmp_path / "m-Q4_K_M.gguf").exists()
