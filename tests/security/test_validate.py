"""The validating read path (gguf_tools/validate.py) and GGUFFile built on it, in process.

gguf-py's own reader is the oracle for valid files: GGUFFile must hand out the same key/values and
tensor views it does. For bad files, GGUFFile must fail before gguf-py or any map is reached, and
the resource limits must hold.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

from gguf_tools import reader as reader_mod
from gguf_tools import validate as V
from gguf_tools.reader import GGUFError, GGUFFile
from tests.security.make_corpus import base_kv, base_tensors, emit, gguf, kv, read_micro

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = json.loads((CORPUS / "MANIFEST.json").read_text())


def same_as_gguf_py(path: Path) -> None:
    ours = GGUFFile(path, check_model=False)
    ref = GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.kv) == keys
    for k in keys:
        f = ref.fields[k]
        want = f.contents()
        main = GGUFValueType(f.types[0]).name
        if main == "FLOAT32":
            want = float(str(np.float32(want)))
        assert ours.kv[k] == want, k
        assert type(ours.kv[k]) is type(want), k
        if main != "ARRAY":
            assert ours.kv_types[k] == main
        elif len(want):
            assert ours.kv_types[k] == f"ARRAY[{GGUFValueType(f.types[-1]).name}]"
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype == t.tensor_type and mine.n_bytes == t.n_bytes
        assert mine.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
        assert mine.data.dtype == t.data.dtype and mine.data.shape == t.data.shape
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(t.data).view(np.uint8))
    assert ours.layout.data_offset == ref.data_offset


def test_same_values_and_views_as_gguf_py(tmp_path, tiny_ckpt):
    same_as_gguf_py(CORPUS / "micro.gguf")
    base = tmp_path / "base.gguf"
    base.write_bytes(gguf(base_kv(), base_tensors()))
    same_as_gguf_py(base)
    from gguf_tools.convert import convert

    q, _ = convert(tiny_ckpt[0], tmp_path / "tiny-q4km.gguf", "Q4_K_M")  # k-quant and F32 tensors
    same_as_gguf_py(q)
    f = GGUFFile(q)
    assert f.layout.spec is not None and f.layout.spec.block_count == 3


@pytest.mark.parametrize("rel", sorted(k for k in MANIFEST if k.startswith("gguf/")))
def test_bad_files_never_reach_gguf_py_or_the_map(rel, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("reached past validation")

    import gguf.gguf_reader

    # nothing in GGUFFile uses gguf-py's reader any more; the guard stays in case something starts to
    monkeypatch.setattr(gguf.gguf_reader, "GGUFReader", boom)
    monkeypatch.setattr(gguf, "GGUFReader", boom)
    monkeypatch.setattr(reader_mod.np, "memmap", boom)
    with pytest.raises(GGUFError) as e:
        GGUFFile(CORPUS / rel)
    assert MANIFEST[rel]["expect"] in str(e.value) and "\n" not in str(e.value)


def test_array_limits(tmp_path, monkeypatch):
    path = tmp_path / "arrays.gguf"
    # 3 million one-byte values: the file is 3 MB, the limit is 2^21 values per array
    path.write_bytes(gguf(base_kv() + [kv("x.big", GGUFValueType.ARRAY, [], GGUFValueType.UINT8)[:-8] +
                                       (3_000_000).to_bytes(8, "little") + bytes(3_000_000)], base_tensors()))
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match="over the limit"):
        GGUFFile(path)
    assert time.perf_counter() - t0 < 0.5
    monkeypatch.setattr(V, "MAX_TOTAL_ARRAY_ELEMENTS", 500)  # the micro model has 512 tokens
    with pytest.raises(GGUFError, match="over the limit"):
        GGUFFile(CORPUS / "micro.gguf")
    monkeypatch.setattr(V, "MAX_TENSORS", 10)
    with pytest.raises(GGUFError, match="limit 10"):
        V.validate_gguf(CORPUS / "micro.gguf")


def test_a_real_size_vocabulary_is_quick(tmp_path):
    """262,144 tokens with scores and types, and 300k merges: parsed in well under a second (gguf-py
    needs ~30 us per value: half a minute for this header)."""
    toks = [f"t{i}" for i in range(262144)]
    kvs = [kv("general.architecture", GGUFValueType.STRING, "llama"),
           kv("tokenizer.ggml.tokens", GGUFValueType.ARRAY, toks, GGUFValueType.STRING),
           kv("tokenizer.ggml.scores", GGUFValueType.ARRAY, [0.5] * 262144, GGUFValueType.FLOAT32),
           kv("tokenizer.ggml.token_type", GGUFValueType.ARRAY, [1] * 262144, GGUFValueType.INT32),
           kv("tokenizer.ggml.merges", GGUFValueType.ARRAY, [f"t{i} t{i + 1}" for i in range(300_000)],
              GGUFValueType.STRING)]
    path = tmp_path / "vocab.gguf"
    path.write_bytes(gguf(kvs, base_tensors()))
    t0 = time.perf_counter()
    f = GGUFFile(path)
    assert time.perf_counter() - t0 < 3.0  # ~0.4 s here; generous for a loaded machine
    assert f.kv["tokenizer.ggml.tokens"][-1] == "t262143" and len(f.kv["tokenizer.ggml.merges"]) == 300_000


def test_engine_layout_variants_are_accepted(tmp_path):
    """What WeightStore accepts, the validator accepts: split gate/up experts, `self_cond_norm`, no
    rope_freqs and no encoder scales."""
    items, tensors = read_micro(CORPUS / "micro.gguf")
    out = []
    for t in tensors:
        name = t["name"]
        if name == "rope_freqs.weight" or name.endswith("enc_layer_output_scale.weight"):
            continue
        if name == "self_cond_pre_norm.weight":
            out.append(dict(t, name="self_cond_norm.weight"))
        elif name.endswith("ffn_gate_up_exps.weight"):
            h, f2, e = t["ne"]
            raw = np.frombuffer(t["data"], np.uint16).reshape(e, f2, h)
            for part, rows in (("gate", raw[:, : f2 // 2]), ("up", raw[:, f2 // 2:])):
                out.append({"name": name.replace("gate_up", part), "ne": (h, f2 // 2, e), "type": t["type"],
                            "data": np.ascontiguousarray(rows).tobytes()})
        else:
            out.append(t)
    path = tmp_path / "variant.gguf"
    path.write_bytes(emit(items, out))
    from engine.weights import WeightStore

    store = WeightStore(GGUFFile(path))
    assert not store.fused_gate_up[0] and store.self_cond_norm == "self_cond_norm.weight"


def test_imatrix_reader_is_validated_too():
    from gguf_tools.imatrix import ImatrixError, load_imatrix

    with pytest.raises(ImatrixError, match="not a readable GGUF imatrix .*data offset"):
        load_imatrix(CORPUS / "gguf" / "offset_huge.gguf")


def test_transformers_checkpoints_pass_the_safetensors_checks(tiny_ckpt):
    """Contiguous data, nothing after it, metadata of strings: what save_pretrained writes."""
    from gguf_tools.safetensors_io import Checkpoint

    ckpt = Checkpoint(tiny_ckpt[0])
    assert len({t.file for t in ckpt.tensors.values()}) > 1
