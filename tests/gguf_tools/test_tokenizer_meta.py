"""tokenizer_kv writes what llama.cpp's Gemma4 converter writes, without needing transformers.

The oracle re-enacts `Gemma4Model.set_vocab` (llama.cpp conversion/gemma.py) on a GGUFWriter with
gguf-py's own LlamaHfVocab and SpecialVocab, which load the tokenizer through transformers, and
reads back what the writer holds: keys in order, values, with later writes overwriting in place.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import pytest

from gguf_tools.tiny_tokenizer import SPECIAL_TOKENS, build_vocab, write_tiny_tokenizer
from gguf_tools.tokenizer_meta import GEMMA4_VISIBLE, tokenizer_kv

pytest.importorskip("transformers")

CONFIG = {"eos_token_id": [1, 106, 50], "pad_token_id": 0, "bos_token_id": 2,
          "text_config": {"eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0}}
_VTYPE = {gguf.GGUFValueType.STRING: "str", gguf.GGUFValueType.UINT32: "u32", gguf.GGUFValueType.BOOL: "bool"}


def oracle(folder: Path) -> list[tuple[str, object, str]]:
    logging.getLogger("gguf").setLevel(logging.ERROR)
    w = gguf.GGUFWriter(None, "gemma4")
    tokens, scores, types = [], [], []
    for text, score, kind in gguf.LlamaHfVocab(folder).all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(gguf.TokenType.USER_DEFINED if text.decode() in GEMMA4_VISIBLE else kind)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    out = []
    for key, v in w.kv_data[0].items():
        if key == "general.architecture":
            continue
        if v.type == gguf.GGUFValueType.ARRAY:  # the writer picks the element type from the first one
            first = v.value[0]
            sub = "str" if isinstance(first, (bytes, str)) else "f32" if isinstance(first, float) else "i32"
            value = [x.decode() if isinstance(x, bytes) else x if isinstance(x, (str, float)) else int(x)
                     for x in v.value]
            out.append((key, value, sub + "[]"))
        else:
            out.append((key, v.value, _VTYPE[v.type]))
    return out


def tiny_dir(tmp_path: Path, vocab_size: int = 512) -> Path:
    write_tiny_tokenizer(tmp_path, vocab_size)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def edit(folder: Path, name: str, change) -> None:
    data = json.loads((folder / name).read_text(encoding="utf-8"))
    change(data)
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


@pytest.mark.parametrize("vocab_size", [512, 1024, 4096])
def test_matches_gguf_py_on_the_tiny_tokenizer(tmp_path, vocab_size):
    folder = tiny_dir(tmp_path, vocab_size)
    assert tokenizer_kv(folder) == oracle(folder)


def _jinja_file(d: Path) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").write_text(cfg.pop("chat_template"))
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


def _named_templates(d: Path) -> None:
    _jinja_file(d)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ bos_token }}tools")


def _added_past_base(d: Path) -> None:
    def change(tok):
        for i, (text, special) in enumerate([("<extra>", False), ("<extra_special>", True)]):
            tok["added_tokens"].append({"id": 512 + i, "content": text, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": special})
    edit(d, "tokenizer.json", change)
    edit(d, "tokenizer_config.json", lambda c: c["extra_special_tokens"].update(x_token="<extra_special>"))


def _eos_in_post_processor(d: Path) -> None:
    def special(t):
        return {"SpecialToken": {"id": t, "type_id": 0}}

    def seq(s):
        return {"Sequence": {"id": s, "type_id": 0}}

    ids = {"<bos>": 2, "<eos>": 1, "<turn|>": 106}
    edit(d, "tokenizer.json", lambda t: t.update(post_processor={
        "type": "TemplateProcessing",
        "single": [special("<bos>"), seq("A"), special("<turn|>")],
        "pair": [special("<bos>"), seq("A"), special("<eos>"), seq("B"), special("<turn|>")],
        "special_tokens": {k: {"id": k, "ids": [v], "tokens": [k]} for k, v in ids.items()}}))


VARIANTS = {
    "template in chat_template.jinja": _jinja_file,
    "named extra templates": _named_templates,
    "merges as 'a b' strings": lambda d: edit(d, "tokenizer.json", lambda t: t["model"].update(
        merges=[" ".join(p) for p in t["model"]["merges"]])),
    "added tokens past the base vocabulary": _added_past_base,
    "specials as a list": lambda d: edit(d, "tokenizer_config.json", lambda c: c.update(
        extra_special_tokens=list(c["extra_special_tokens"].values())[:4])),
    "specials as top-level keys": lambda d: edit(d, "tokenizer_config.json", lambda c: c.update(
        c.pop("extra_special_tokens"))),
    "no post-processor": lambda d: edit(d, "tokenizer.json", lambda t: t.update(post_processor=None)),
    "eos from the post-processor": _eos_in_post_processor,
    "no mask, no add_bos": lambda d: edit(d, "tokenizer_config.json", lambda c: (
        c.pop("mask_token"), c.update(add_bos_token=False))),
    "no config.json": lambda d: (d / "config.json").unlink(),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_gguf_py_on_variants(tmp_path, variant):
    folder = tiny_dir(tmp_path)
    VARIANTS[variant](folder)
    assert tokenizer_kv(folder) == oracle(folder)


def test_gemma4_layout(tmp_path):
    kv = {k: v for k, v, _ in tokenizer_kv(tiny_dir(tmp_path))}
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == 512 and kv["tokenizer.ggml.model"] == "gemma4"
    for i, text in SPECIAL_TOKENS.items():
        assert tokens[i] == text
        want = gguf.TokenType.USER_DEFINED if text in GEMMA4_VISIBLE else gguf.TokenType.CONTROL
        assert types[i] == want, text
    assert tokens[107] == "\n" and types[107] == gguf.TokenType.NORMAL
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    assert set(kv["tokenizer.ggml.scores"]) == {-1000.0}
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"],
            kv["tokenizer.ggml.padding_token_id"], kv["tokenizer.ggml.unknown_token_id"]) == (2, 1, 0, 3)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False
    assert "<|turn>model" in kv["tokenizer.chat_template"] and "enable_thinking" in kv["tokenizer.chat_template"]


def test_no_template_no_key(tmp_path):
    folder = tiny_dir(tmp_path)
    edit(folder, "tokenizer_config.json", lambda c: c.pop("chat_template"))
    keys = [k for k, _, _ in tokenizer_kv(folder)]
    assert "tokenizer.chat_template" not in keys and keys[-1] == "tokenizer.ggml.add_space_prefix"


def test_tiny_tokenizer_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    for n in (512, 1024):
        folder = tmp_path / str(n)
        write_tiny_tokenizer(folder, n)
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.is_fast and len(tok) == n and tok.vocab_size == n
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
        assert tok.convert_tokens_to_ids(["<|turn>", "<turn|>", "<|channel>", "<channel|>", "\n"]) == [
            105, 106, 100, 101, 107]
        ids = tok("The answer is 42.").input_ids
        assert ids[0] == 2 and tok.unk_token_id not in ids
        assert tok.decode(tok("naïve café, 12 € ✓").input_ids, skip_special_tokens=True) == "naïve café, 12 € ✓"


def test_tiny_tokenizer_is_deterministic(tmp_path):
    write_tiny_tokenizer(tmp_path / "a", 1024)
    write_tiny_tokenizer(tmp_path / "b", 1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    tokens, merges = build_vocab(512)
    assert len(set(tokens)) == 512 and len(merges) > 100


def test_tiny_tokenizer_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        build_vocab(300)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json") as e:
        tokenizer_kv(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_malformed_files_are_named(tmp_path):
    folder = tiny_dir(tmp_path)
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON"):
        tokenizer_kv(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}, "decoder": None}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a Gemma-style tokenizer"):
        tokenizer_kv(folder)
    edit_model = {"type": "BPE", "byte_fallback": True, "vocab": {"a": 0}, "merges": []}
    (folder / "tokenizer.json").write_text(json.dumps({"model": edit_model, "decoder": {"type": "Sequence"},
                                                        "added_tokens": [{"id": 1}]}))
    with pytest.raises(ValueError, match=r"tokenizer\.json: malformed vocabulary"):
        tokenizer_kv(folder)
    write_tiny_tokenizer(folder, 512)
    (folder / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        tokenizer_kv(folder)
