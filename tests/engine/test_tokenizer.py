"""The engine's tokenizer, built from GGUF keys alone, agrees with transformers and llama.cpp."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import pytest

from engine.tokenizer import GGUFTokenizer, gemma4_chat
from gguf_tools.tiny_tokenizer import write_tiny_tokenizer
from gguf_tools.tokenizer_meta import tokenizer_kv

TEXTS = [
    "Hello world! 1234",
    "The answer is 42, not 41.",
    "  leading and  double  spaces ",
    "line one\nline two\n\n\nend\n",
    "naïve café, 12 € ✓ 日本語 🙂",  # outside the tiny vocabulary: byte fallback
    "<|turn>user\nhi<turn|>\n<|turn>model\n",
    "x<|channel>thought\n<channel|>y<|tool_call>call:f{}<tool_call|>",
    "<bos>text<eos> and <0x41> is four characters",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path, 512)
    return path


@pytest.fixture(scope="module")
def kv(folder) -> dict:
    return {k: v for k, v, _ in tokenizer_kv(folder)}


@pytest.fixture(scope="module")
def tok(kv) -> GGUFTokenizer:
    return GGUFTokenizer.from_kv(kv)


@pytest.fixture(scope="module")
def hf(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


def write_vocab_gguf(path: Path, kv_list) -> None:
    """A GGUF with only a vocabulary (and the few keys llama.cpp's loader insists on)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("llama.context_length", 64), ("llama.embedding_length", 8), ("llama.block_count", 1),
                       ("llama.feed_forward_length", 8), ("llama.attention.head_count", 1)]:
        w.add_uint32(key, value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    sub = {"str": gguf.GGUFValueType.STRING, "f32": gguf.GGUFValueType.FLOAT32, "i32": gguf.GGUFValueType.INT32,
           "u32": gguf.GGUFValueType.UINT32, "bool": gguf.GGUFValueType.BOOL}
    for key, value, vtype in kv_list:
        if vtype.endswith("[]"):
            w.add_key_value(key, list(value), gguf.GGUFValueType.ARRAY, sub_type=sub[vtype[:-2]])
        else:
            w.add_key_value(key, value, sub[vtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_same_ids_as_transformers(tok, hf):
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids, text
        assert tok.encode(text, add_bos=True) == hf(text).input_ids, text
        assert tok.raw(text) == hf(text).input_ids, text


def test_specials_digits_and_bytes(tok):
    assert tok.encode("<|turn>user\n")[0] == 105 and tok.encode("<turn|>") == [106]
    assert tok.encode("<|channel><channel|>") == [100, 101]
    assert tok.encode("\n") == [107]
    ids = tok.encode("é")
    assert [tok.tokens[i] for i in ids] == ["<0xC3>", "<0xA9>"]
    assert all(tok.tokens[i] in "0123456789" for i in tok.encode("2025"))
    assert tok.bos_id == 2 and tok.eos_ids == (1, 106, 50)


def test_same_ids_as_llama_cpp(tok, kv, folder, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, tokenizer_kv(folder))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, "llama.cpp refused the vocabulary"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        for text in TEXTS:
            raw = text.encode()
            buf = (llama_cpp.llama_token * (len(raw) + 8))()
            n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, True)
            assert tok.encode(text, add_bos=True) == list(buf[:n]), text
        assert [i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)] == sorted(tok.eos_ids)
    finally:
        llama_cpp.llama_model_free(model)


def test_decode(tok):
    for text in TEXTS[:5]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("one<turn|>two")
    assert tok.decode(ids) == "one"
    assert tok.decode(ids, stop_at_eos=False) == "onetwo"  # control tokens are not shown
    assert tok.decode(ids, stop_at_eos=False, keep_control=True) == "one<turn|>two"
    # the channel markers are user-defined in Gemma 4: always shown, so a parser can find them
    assert tok.decode(tok.encode("<|channel>thought\n<channel|>ok")) == "<|channel>thought\n<channel|>ok"


def test_chat_layout_thinking_off(tok):
    ids = tok.apply_chat([{"role": "user", "content": "Hello"}])
    enc = tok.encode
    want = [2, 105, *enc("user"), 107, *enc("Hello"), 106, 107, 105, *enc("model"), 107, 100, *enc("thought"), 107,
            101]
    assert ids == want
    assert tok.render_chat(MESSAGES).endswith("<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_chat_layout_thinking_on(tok):
    text = tok.render_chat(MESSAGES, think=True)
    assert text.startswith("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n<|turn>user\n")
    assert "<|turn>model\n4<turn|>\n" in text and text.endswith("<|turn>model\n")
    ids = tok.apply_chat(MESSAGES, think=True)
    assert ids[:3] == [2, 105, tok.encode("system")[0]] and 98 in ids and 100 not in ids
    no_prompt = tok.render_chat(MESSAGES, add_generation_prompt=False)
    assert no_prompt.endswith("<|turn>user\nAnd 3+3?<turn|>\n")


def test_chat_matches_transformers_and_builtin(tok, hf):
    for msgs in (MESSAGES, MESSAGES[1:], [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]):
        for think in (False, True):
            want = hf.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=think, tokenize=False)
            assert tok.render_chat(msgs, think) == want
            assert gemma4_chat(msgs, think) == want
            assert tok.apply_chat(msgs, think) == hf.apply_chat_template(
                msgs, add_generation_prompt=True, enable_thinking=think, tokenize=True, return_dict=False)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ messages.append({'role': 'x'}) }}{{ messages }}",
    "{{ cycler.__init__.__globals__.os.getcwd() }}",
    "{{ raise_exception('no') }}",
    "{% if %}",
])
def test_hostile_or_broken_template_falls_back(kv, template, caplog):
    tok = GGUFTokenizer.from_kv(dict(kv, **{"tokenizer.chat_template": template}))
    with caplog.at_level(logging.WARNING, logger="engine.tokenizer"):
        text = tok.render_chat(MESSAGES)
    assert text == gemma4_chat(MESSAGES)
    assert "<class" not in text and "subclasses" not in text and "built-in" in caplog.text


def test_missing_template_uses_builtin(kv):
    plain = dict(kv)
    plain.pop("tokenizer.chat_template")
    tok = GGUFTokenizer.from_kv(plain)
    assert tok.render_chat(MESSAGES, think=True) == gemma4_chat(MESSAGES, think=True)


def test_template_without_bos_gets_one(kv):
    tok = GGUFTokenizer.from_kv(dict(kv, **{"tokenizer.chat_template": "{{ messages[0]['content'] }}"}))
    assert tok.apply_chat([{"role": "user", "content": "hi"}]) == [2, *tok.encode("hi")]


def test_from_gguf_reader_values(kv, folder, tmp_path):
    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, tokenizer_kv(folder))
    reader = gguf.GGUFReader(path)
    read = {f.name: f.contents() for f in reader.fields.values()}
    tok = GGUFTokenizer.from_kv(read)
    assert tok.encode(TEXTS[3], add_bos=True) == GGUFTokenizer.from_kv(kv).raw(TEXTS[3])


def test_bad_keys(kv):
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        GGUFTokenizer.from_kv({})
    with pytest.raises(ValueError, match="gemma4"):
        GGUFTokenizer.from_kv(dict(kv, **{"tokenizer.ggml.model": "gpt2"}))
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        GGUFTokenizer.from_kv(dict(kv, **{"tokenizer.ggml.merges": ["zz qq"]}))
    with pytest.raises(ValueError, match="token types"):
        GGUFTokenizer.from_kv(dict(kv, **{"tokenizer.ggml.token_type": [1, 1]}))
