"""Write the crafted-file corpus of tests/security/corpus/ (checked in; rerun to regenerate).

    python -m tests.security.make_corpus

Every file is small. Each bad file breaks exactly one rule, and MANIFEST.json records what the
one-line error must say (`expect`), so tests/security/test_corpus.py can check every file through
the command line. The kinds (issue 7):

- gguf/: header, key/value, tensor-info, alignment and data-offset forgeries (on a ~700-byte
  structural base), and model-level ones (missing tensor, wrong shape, bad metadata) on `micro.gguf`,
  a complete two-layer diffusion-gemma model made by our converter from a synthetic checkpoint;
- safetensors/: forged shard headers, run through `diffgemma quantize` in a checkpoint folder made of
  ckpt/ (config and tokenizer of the same micro model) plus the shard;
- index/: forged model.safetensors.index.json files (paths out of the folder, bad JSON);
- template/: micro.gguf with chat templates that try to reach Python objects (the CVE-2024-34359
  payload shape) or to exhaust time and memory: these must *run*, with the safe template.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
ALIGN = 32

# ---- a raw GGUF writer: every field explicit, so any of them can be forged ------------------------------

_FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
        V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: V, v: Any, etype: V | None = None) -> bytes:
    if vtype == V.STRING:
        return gstr(v)
    if vtype == V.ARRAY:
        assert etype is not None
        return struct.pack("<IQ", etype, len(v)) + b"".join(value(etype, x) for x in v)
    return struct.pack(_FMT[vtype], v)


def kv(key: str | bytes, vtype: V, v: Any, etype: V | None = None) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + value(vtype, v, etype)


def tinfo(name: str | bytes, ne: tuple[int, ...], qtype: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + \
        struct.pack("<IQ", qtype, offset)


def pad(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def gguf(kvs: list[bytes], tensors: list[dict[str, Any]], *, magic: bytes = b"GGUF", version: int = 3,
         n_tensors: int | None = None, n_kv: int | None = None, align: int = ALIGN) -> bytes:
    """tensors: dicts of name, ne, type, data and optionally `offset` (a forged offset; the data
    still goes where the honest offset would put it)."""
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos += pad(len(t["data"]), align)
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs)
    head += b"".join(tinfo(t["name"], t["ne"], t["type"], t.get("offset", off)) for t, off in zip(tensors, offsets))
    out = bytearray(head + b"\0" * (pad(len(head), align) - len(head)))
    for t in tensors:
        out += t["data"] + b"\0" * (pad(len(t["data"]), align) - len(t["data"]))
    return bytes(out)


# ---- the structural base -------------------------------------------------------------------------------

def base_kv() -> list[bytes]:
    return [kv("general.architecture", V.STRING, "diffusion-gemma"), kv("general.name", V.STRING, "corpus"),
            kv("general.alignment", V.UINT32, 32),
            kv("tokenizer.ggml.tokens", V.ARRAY, ["<pad>", "<eos>", "<bos>", "a"], V.STRING)]


def base_tensors() -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    q8 = bytearray(rng.integers(0, 256, 2 * 34, dtype=np.uint8).tobytes())
    for r in range(2):  # finite fp16 scales
        q8[r * 34:r * 34 + 2] = np.float16(0.01).tobytes()
    return [
        {"name": "token_embd.weight", "ne": (8, 4), "type": Q.F32,
         "data": rng.standard_normal(32).astype("<f4").tobytes()},
        {"name": "blk.0.attn_q.weight", "ne": (32, 2), "type": Q.Q8_0, "data": bytes(q8)},
        {"name": "output_norm.weight", "ne": (8,), "type": Q.F32, "data": np.ones(8, "<f4").tobytes()},
    ]


def structural_cases() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, expected text in the error, what it forges)."""
    K, T = base_kv, base_tensors
    ok = gguf(K(), T())
    cases: dict[str, tuple[bytes, str, str]] = {}

    def add(name: str, data: bytes, expect: str, about: str) -> None:
        cases[name] = (data, expect, about)

    def with_tensor(i: int, **change: Any) -> list[dict[str, Any]]:
        ts = T()
        ts[i].update(change)
        return ts

    add("empty", b"", "truncated", "a zero-byte file")
    add("bad_magic", b"GGML" + ok[4:], "bad magic", "wrong magic bytes")
    add("header_cut", ok[:20], "truncated", "file ends inside the fixed header")
    add("kv_cut", ok[:140], "left in the file", "file ends inside a key/value pair")
    add("version_1", gguf(K(), T(), version=1), "version 1", "GGUF v1 (u32 counts), refused by llama.cpp")
    add("version_byteswapped", gguf(K(), T(), version=3 << 24), "big-endian", "version with low 16 bits zero")
    add("version_99", gguf(K(), T(), version=99), "unsupported GGUF version", "unknown version")
    add("tensor_count_huge", gguf(K(), T(), n_tensors=2**63 + 5), "tensor count", "tensor count near 2^63")
    add("tensor_count_over_file", gguf(K(), T(), n_tensors=1000), "tensor count",
        "1000 tensors claimed in a 700-byte file")
    add("tensor_count_plus_one", gguf(K(), T(), n_tensors=4), "name of tensor #3",
        "one more tensor than the file holds")
    add("kv_count_huge", gguf(K(), T(), n_kv=2**40), "key/value count", "key/value count 2^40")
    add("kv_count_plus_one", gguf(K(), T(), n_kv=5), "", "one more key than written: the tensor infos are "
        "read as a key (any one-line error will do)")
    add("key_length_huge", gguf([struct.pack("<Q", 2**64 - 1) + b"abc"] + K(), T()),
        "claims", "a key whose length is 2^64-1")
    add("string_value_past_eof", gguf(K()[:1] + [gstr("general.name") + struct.pack("<IQ", V.STRING, 10**9)],
                                      T()), "claims", "a string value longer than the file")
    add("array_count_huge", gguf(K() + [gstr("x.arr") + struct.pack("<IIQ", V.ARRAY, V.UINT8, 2**60)], T()),
        "claims", "an u8 array of 2^60 elements")
    add("string_array_count_huge", gguf(K() + [gstr("x.arr") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2**40)], T()),
        "claims", "a string array of 2^40 elements")
    add("string_array_element_past_eof",
        gguf(K() + [gstr("x.arr") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2) + gstr("a") + struct.pack("<Q", 2**50)],
             T()), "claims", "an array element whose length runs past the file")
    add("nested_array", gguf(K() + [gstr("x.arr") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1) +
                                    struct.pack("<IQ", V.UINT8, 1) + b"\1"], T()), "array of arrays",
        "an array of arrays")
    add("value_type_invalid", gguf(K() + [gstr("x.bad") + struct.pack("<I", 13) + b"\0" * 8], T()),
        "invalid value type", "value type 13")
    add("array_type_invalid", gguf(K() + [gstr("x.bad") + struct.pack("<IIQ", V.ARRAY, 77, 1) + b"\0" * 8], T()),
        "array of invalid type", "array element type 77")
    add("key_not_utf8", gguf(K() + [kv(b"x.\xff\xfe", V.UINT8, 1)], T()), "not valid UTF-8", "key bytes FF FE")
    add("value_not_utf8", gguf(K() + [kv("x.s", V.STRING, b"\xc3\x28")], T()), "not valid UTF-8",
        "string value with a broken UTF-8 sequence")
    add("array_string_not_utf8", gguf(K() + [kv("x.a", V.ARRAY, [b"ok", b"\xed\xa0\x80"], V.STRING)], T()),
        "not valid UTF-8", "a surrogate encoded in a string array element")
    add("key_empty", gguf(K() + [kv("", V.UINT8, 1)], T()), "is empty", "an empty key")
    add("key_duplicate", gguf(K() + [kv("general.name", V.STRING, "again")], T()), "duplicate key",
        "the same key twice")
    add("key_reserved", gguf(K() + [kv("GGUF.version", V.UINT32, 3)], T()), "duplicate key",
        "a key gguf-py reserves for the header")
    add("alignment_not_power_of_two", gguf(K()[:2] + [kv("general.alignment", V.UINT32, 24)] + K()[3:], T()),
        "power of two", "general.alignment = 24")
    add("alignment_zero", gguf(K()[:2] + [kv("general.alignment", V.UINT32, 0)] + K()[3:], T()),
        "power of two", "general.alignment = 0")
    add("alignment_wrong_type", gguf(K()[:2] + [kv("general.alignment", V.UINT64, 32)] + K()[3:], T()),
        "not UINT32", "general.alignment stored as u64")
    add("tensor_name_too_long", gguf(K(), with_tensor(2, name="x" * 64)), "GGML_MAX_NAME",
        "a 64-byte tensor name")
    add("tensor_name_empty", gguf(K(), with_tensor(2, name="")), "empty name", "an empty tensor name")
    add("tensor_name_duplicate", gguf(K(), with_tensor(2, name="token_embd.weight")), "duplicate tensor name",
        "two tensors with one name")
    add("tensor_name_newline_duplicate", gguf(K(), [dict(t, name="evil\nname") for t in T()[:2]]),
        "duplicate tensor name", "a name with a newline (the error must stay on one line)")
    add("tensor_name_not_utf8", gguf(K(), with_tensor(2, name=b"\x80abc")), "not valid UTF-8",
        "tensor name bytes 80 61 62 63")
    add("n_dims_zero", gguf(K(), with_tensor(2, ne=())), "dimensions (1 to 4", "n_dims = 0")
    add("n_dims_five", gguf(K(), with_tensor(2, ne=(8, 1, 1, 1, 1))), "dimensions (1 to 4", "n_dims = 5")
    add("n_dims_huge", _forge_n_dims(ok), "dimensions", "n_dims = 2^31")
    add("dim_negative", gguf(K(), with_tensor(2, ne=(2**64 - 8,))), "negative dimension", "ne0 = -8")
    add("dim_product_overflow", gguf(K(), with_tensor(2, ne=(2**32, 2**32, 2**32))), "overflows int64",
        "ne = 2^32 x 2^32 x 2^32")
    add("dim_product_past_file", gguf(K(), with_tensor(2, ne=(2**31, 2**31))), "past the end of the file",
        "2^62 elements claimed (fits int64, not the file)")
    add("type_removed", gguf(K(), with_tensor(2, type=4)), "unknown ggml type id 4", "Q4_2, removed from ggml")
    add("type_huge", gguf(K(), with_tensor(2, type=2**32 - 1)), "unknown ggml type id", "type id 2^32-1")
    add("row_not_whole_blocks", gguf(K(), with_tensor(1, ne=(33, 2))), "block size", "Q8_0 rows of 33 values")
    add("offset_gap", gguf(K(), with_tensor(1, offset=160)), "expected 128", "a 32-byte gap before tensor 1")
    add("offset_overlap", gguf(K(), with_tensor(1, offset=0)), "expected 128", "tensor 1 over tensor 0")
    add("offset_unaligned", gguf(K(), with_tensor(1, offset=129)), "expected 128", "offset 129 with alignment 32")
    add("offset_huge", gguf(K(), with_tensor(2, offset=2**64 - 32)), "expected", "offset 2^64-32")
    add("offsets_reordered", gguf(K(), [dict(t, offset=o) for t, o in zip(T(), (0, 224, 128))]),
        "expected 128", "tensor data in another order than the infos")
    add("data_cut", ok[:-40], "past the end of the file", "the last tensor's data cut short")
    add("data_missing", ok[:len(ok) - 256], "past the end of the file", "header only, no data")
    return cases


def _forge_n_dims(data: bytes) -> bytes:
    """The last tensor info's n_dims set to 2^31 (everything after it left as it was)."""
    i = data.rfind(gstr("output_norm.weight")) + len(gstr("output_norm.weight"))
    return data[:i] + struct.pack("<I", 2**31) + data[i + 4:]


# ---- the micro model -----------------------------------------------------------------------------------

def micro_config() -> tuple[dict, dict]:
    from gguf_tools.synthetic import tiny_config

    cfg, gen = tiny_config(vocab_size=512)
    cfg["text_config"].update(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
                              layer_types=["sliding_attention", "full_attention"], num_experts=2, top_k_experts=1,
                              moe_intermediate_size=16, max_position_embeddings=512)
    cfg["canvas_length"] = 8
    gen.update(max_new_tokens=8, max_denoising_steps=4)
    return cfg, gen


def make_micro(folder: Path) -> tuple[Path, Path]:
    """(checkpoint folder, micro.gguf) made with our own converter."""
    from gguf_tools.convert import convert
    from gguf_tools.synthetic import write_checkpoint, write_tokenizer

    src = folder / "micro"
    cfg, gen = micro_config()
    write_checkpoint(src, cfg, gen, seed=7)
    write_tokenizer(src, 512)
    out, _ = convert(src, folder / "micro.gguf", "BF16")
    return src, out


_VT = {v.name: v for v in V}


def read_micro(path: Path) -> tuple[list[tuple[str, V, Any, V | None]], list[dict[str, Any]]]:
    from gguf_tools.validate import validate_gguf

    layout = validate_gguf(path)
    items = []
    for key, v in layout.kv.items():
        t = layout.kv_types[key]
        if t.startswith("ARRAY["):
            items.append((key, V.ARRAY, list(v), _VT[t[6:-1]]))
        else:
            items.append((key, _VT[t], v, None))
    raw = path.read_bytes()
    tensors = [{"name": t.name, "ne": t.ne, "type": int(t.ggml_type),
                "data": raw[layout.data_offset + t.offset: layout.data_offset + t.offset + t.n_bytes]}
               for t in layout.tensors.values()]
    return items, tensors


def emit(items: list[tuple[str, V, Any, V | None]], tensors: list[dict[str, Any]]) -> bytes:
    return gguf([kv(k, t, v, e) for k, t, v, e in items], tensors)


def model_cases(micro: Path) -> dict[str, tuple[bytes, str, str]]:
    items, tensors = read_micro(micro)
    A = "diffusion-gemma."
    cases: dict[str, tuple[bytes, str, str]] = {}

    def set_kv(key: str, vtype: V, v: Any, etype: V | None = None) -> list:
        out = [it for it in items if it[0] != key]
        pos = next((i for i, it in enumerate(items) if it[0] == key), len(items))
        out.insert(pos, (key, vtype, v, etype))
        return out

    def drop_kv(key: str) -> list:
        return [it for it in items if it[0] != key]

    def change_tensor(name: str, **change: Any) -> list[dict[str, Any]]:
        return [dict(t, **change) if t["name"] == name else t for t in tensors]

    def add(name: str, data: bytes, expect: str, about: str) -> None:
        cases[name] = (data, expect, about)

    add("model_missing_tensor", emit(items, [t for t in tensors if t["name"] != "blk.1.ffn_down_exps.weight"]),
        "missing required tensor 'blk.1.ffn_down_exps.weight'", "an expert tensor left out")
    q = next(t for t in tensors if t["name"] == "blk.0.attn_q.weight")
    add("model_wrong_shape", emit(items, change_tensor("blk.0.attn_q.weight", ne=(q["ne"][0], q["ne"][1] + 1),
                                                       data=q["data"] + q["data"][: 2 * q["ne"][0]])),
        "'blk.0.attn_q.weight' has shape [17, 16]", "attn_q with one row too many")
    toks = next(it for it in items if it[0] == "tokenizer.ggml.tokens")[2]
    add("model_vocab_mismatch", emit(set_kv("tokenizer.ggml.tokens", V.ARRAY, toks[:-1], V.STRING), tensors),
        "token_embd.weight", "one token fewer than embedding rows")
    add("model_missing_key", emit(drop_kv(A + "embedding_length"), tensors), "missing required key",
        "no embedding_length")
    add("model_key_wrong_type", emit(set_kv(A + "embedding_length", V.STRING, "16"), tensors), "has type str",
        "embedding_length stored as a string")
    add("model_key_length_zero", emit(set_kv(A + "attention.key_length", V.UINT32, 0), tensors),
        "does not describe", "key_length 0 (a division by zero in the spec)")
    add("model_pattern_length", emit(set_kv(A + "attention.sliding_window_pattern", V.ARRAY, [True], V.BOOL),
                                     tensors), "sliding_window_pattern", "one pattern entry for two layers")
    add("model_experts_used", emit(set_kv(A + "expert_used_count", V.UINT32, 9), tensors), "top_k_experts",
        "9 of 2 experts used")
    add("model_canvas_zero", emit(set_kv("diffusion.canvas_length", V.UINT32, 0), tensors), "canvas_length",
        "canvas of 0 tokens (a division by zero in run)")
    add("model_canvas_huge", emit(set_kv("diffusion.canvas_length", V.UINT32, 2**31), tensors), "canvas_length",
        "canvas of 2^31 tokens ([C, V] logits would not fit)")
    add("model_steps_zero", emit(set_kv("diffusion.eb_max_steps", V.UINT32, 0), tensors), "eb_max_steps",
        "zero denoising steps")
    add("model_bos_out_of_range", emit(set_kv("tokenizer.ggml.bos_token_id", V.UINT32, 10**6), tensors),
        "bos_token_id", "bos id past the vocabulary")
    add("model_arch_not_string", emit(set_kv("general.architecture", V.UINT32, 7), tensors),
        "general.architecture", "architecture stored as u32")
    rope = next(t for t in tensors if t["name"] == "rope_freqs.weight")
    f16 = np.minimum(np.frombuffer(rope["data"], "<f4"), 60000).astype("<f2").tobytes()
    add("model_rope_freqs_f16", emit(items, change_tensor("rope_freqs.weight", type=int(Q.F16), data=f16)),
        "rope_freqs.weight", "rope_freqs stored as F16")
    return cases


CVE_TEMPLATES = {  # the payload shapes of CVE-2024-34359 and friends: attribute walks to Python internals
    "template_cve_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "template_cve_popen": "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == "
                          "'Popen' %}{{ c('touch PWNED', shell=True) }}{% endif %}{% endfor %}",
    "template_cve_globals": "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}"
                            "{{ raise_exception.__globals__['__builtins__']['open']('PWNED', 'w') }}",
    "template_cve_attr_filter": "{{ ()|attr('__class__')|attr('__base__')|attr('__subclasses__')() }}"
                                "{{ messages.append({'role': 'x'}) }}",
    "template_dos_memory": "{{ 'a' * 10**10 }}{{ 'x'|center(1000000000) }}",
    "template_dos_time": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
}


def template_cases(micro: Path) -> dict[str, bytes]:
    items, tensors = read_micro(micro)
    out = {}
    for name, src in CVE_TEMPLATES.items():
        its = [it for it in items if it[0] != "tokenizer.chat_template"] + \
            [("tokenizer.chat_template", V.STRING, src, None)]
        out[name] = emit(its, tensors)
    return out


# ---- safetensors ---------------------------------------------------------------------------------------

def st(header: bytes | dict | str, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


def safetensors_cases() -> dict[str, tuple[bytes, str, str]]:
    W = "model.decoder.norm.weight"
    good = {W: {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    data = np.ones(4, "<f4").tobytes()
    cases: dict[str, tuple[bytes, str, str]] = {}

    def add(name: str, b: bytes, expect: str, about: str) -> None:
        cases[name] = (b, expect, about)

    def entry(**change: Any) -> dict:
        return {W: dict(good[W], **change)}

    add("st_empty", b"", "truncated", "zero bytes")
    add("st_short", b"\x05\0\0", "truncated", "3 bytes")
    add("st_header_len_huge", st(good, data, n=2**63), "over the", "header length 2^63")
    add("st_header_len_past_eof", st(good, data, n=10_000), "exceeds the file", "header longer than the file")
    add("st_header_not_utf8", st(b'{"\xff": 1}', data), "not valid UTF-8", "header bytes FF")
    add("st_header_not_json", st('{"a": ', data), "malformed safetensors header", "cut JSON")
    add("st_header_not_object", st("[1, 2]", data), "not a JSON object", "a JSON array")
    add("st_header_deep", st('{"a": ' + "[" * 5000 + "]" * 5000 + "}", data), "nested too deeply",
        "5000 nested arrays (RecursionError in json)")
    add("st_header_huge_int", st('{"x": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 16]}}',
                                 data), "malformed safetensors header", "a 5000-digit integer")
    add("st_duplicate_key", st('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                               '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}', data),
        "duplicate key", "one tensor name twice")
    add("st_dtype_unknown", st(entry(dtype="Q4"), data), "unsupported dtype", "dtype Q4")
    add("st_entry_not_object", st({W: 5}, data), "malformed header entry", "an entry that is a number")
    add("st_shape_float", st(entry(shape=[2.5]), data), "malformed shape", "shape [2.5]")
    add("st_shape_bool", st(entry(shape=[True, 4]), data), "malformed shape", "shape [true, 4]")
    add("st_shape_negative", st(entry(shape=[-4]), data), "negative dimension", "shape [-4]")
    add("st_shape_many_dims", st(entry(shape=[1] * 9 + [4]), data), "malformed shape", "10 dimensions")
    add("st_shape_huge", st(entry(shape=[2**62, 2**62]), data), "needs", "2^124 elements in 16 bytes")
    add("st_offsets_past_eof", st(entry(data_offsets=[0, 2**40]), data), "outside the file",
        "end offset 2^40")
    add("st_offsets_reversed", st(entry(data_offsets=[16, 0]), data), "outside the file", "start after end")
    add("st_offsets_negative", st(entry(data_offsets=[-16, 0], shape=[4]), data), "outside the file",
        "offset -16")
    add("st_offsets_malformed", st(entry(data_offsets=[0]), data), "malformed data_offsets", "one offset")
    add("st_dtype_shape_disagree", st(entry(dtype="F16"), data), "needs 8", "F16 [4] in 16 bytes")
    two = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    add("st_overlap", st(two, data + data[:8]), "overlaps", "two tensors sharing 8 bytes")
    gap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}
    add("st_gap", st(gap, data), "unused bytes", "4 bytes no tensor owns")
    add("st_trailing_bytes", st(good, data + b"\0" * 8), "after the last tensor", "8 bytes after the data")
    add("st_metadata_not_strings", st({"__metadata__": {"format": 5}, **good}, data), "__metadata__",
        "metadata value that is a number")
    return cases


def index_cases() -> dict[str, tuple[bytes, str, str]]:
    def idx(wm: Any) -> bytes:
        return json.dumps({"metadata": {}, "weight_map": wm}).encode()

    W = "model.decoder.norm.weight"
    return {
        "index_traversal": (idx({W: "../../outside.safetensors"}), "not a file name", "a shard path out of the folder"),
        "index_absolute": (idx({W: "/dev/zero"}), "not a file name", "a shard that is /dev/zero"),
        "index_not_json": (b'{"weight_map": ', "malformed index", "cut JSON"),
        "index_values_not_str": (idx({W: 5}), "malformed index", "a shard name that is a number"),
        "index_deep": (b'{"weight_map": ' + b"[" * 5000 + b"]" * 5000 + b"}", "malformed index", "5000 nested arrays"),
    }


# ---- write everything ----------------------------------------------------------------------------------

def main() -> None:
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    for sub in ("gguf", "safetensors", "index", "template", "ckpt"):
        (CORPUS / sub).mkdir(parents=True)
    # *.gguf is ignored at the top level (build outputs); these files are test data
    (CORPUS / ".gitignore").write_text("!*.gguf\n")
    manifest: dict[str, dict[str, str]] = {}

    def put(sub: str, name: str, data: bytes, expect: str, about: str, ext: str) -> None:
        rel = f"{sub}/{name}{ext}"
        (CORPUS / rel).write_bytes(data)
        manifest[rel] = {"expect": expect, "about": about}

    for name, (data, expect, about) in structural_cases().items():
        put("gguf", name, data, expect, about, ".gguf")
    with tempfile.TemporaryDirectory() as tmp:
        src, micro = make_micro(Path(tmp))
        shutil.copy(micro, CORPUS / "micro.gguf")
        for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, CORPUS / "ckpt" / f)
        for name, (data, expect, about) in model_cases(micro).items():
            put("gguf", name, data, expect, about, ".gguf")
        for name, data in template_cases(micro).items():
            put("template", name, data, "", CVE_TEMPLATES[name], ".gguf")
    for name, (data, expect, about) in safetensors_cases().items():
        put("safetensors", name, data, expect, about, ".safetensors")
    for name, (data, expect, about) in index_cases().items():
        put("index", name, data, expect, about, ".json")
    (CORPUS / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in CORPUS.rglob("*") if p.is_file())
    print(f"wrote {len(manifest)} crafted files + micro.gguf to {CORPUS} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
