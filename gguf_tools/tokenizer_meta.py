"""The `tokenizer.ggml.*` keys of a Gemma 4 GGUF, computed from the checkpoint's tokenizer files.

llama.cpp's Gemma4 converter gets these from gguf-py's `LlamaHfVocab` and `SpecialVocab`, and the
former loads the tokenizer through transformers. We must not need transformers at conversion time,
so this module reads the same files (tokenizer.json, tokenizer_config.json, config.json and the
optional chat_template.jinja / chat_template.json) and reproduces what those two classes compute:

- tokens: the base vocabulary by id, then added tokens whose ids lie past it;
- scores: -1000 for every token (LlamaHfVocab has no real scores for BPE);
- types: BYTE for `<0xNN>`, CONTROL for the tokenizer's special tokens, NORMAL otherwise, and
  USER_DEFINED for non-special added tokens; then Gemma 4 marks its seven "visible" channel and
  tool tokens USER_DEFINED so llama.cpp always prints them for the chat parser;
- merges, special token ids, add_*_token flags and the chat template as SpecialVocab finds them.

"Special tokens" follows transformers 5: the named ones (bos, eos, unk, sep, pad, cls, mask, the
Gemma tokenizer class's defaults for those it leaves out, and any model-specific `*_token` key)
plus `extra_special_tokens`. The test suite checks all of this against gguf-py itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gguf import Keys, TokenType

KV = tuple[str, Any, str]
T = Keys.Tokenizer

# Rendered as text by llama.cpp even when special tokens are hidden (conversion/gemma.py).
GEMMA4_VISIBLE = frozenset({"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                            "<tool_response|>", '<|"|>'})

_STANDARD = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# transformers' GemmaTokenizer fills these in when tokenizer_config.json does not name them.
_GEMMA_DEFAULTS = {"bos": "<bos>", "eos": "<eos>", "unk": "<unk>", "pad": "<pad>", "mask": "<mask>"}
_ID_KEYS = {"bos": T.BOS_ID, "eos": T.EOS_ID, "unk": T.UNK_ID, "sep": T.SEP_ID, "pad": T.PAD_ID,
            "mask": T.MASK_ID, "eot": T.EOT_ID, "eom": T.EOM_ID}  # gguf-py has no writer for cls
_ADD_KEYS = {"bos": T.ADD_BOS, "eos": T.ADD_EOS, "sep": T.ADD_SEP}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _read_json(path: Path, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise ValueError(f"{path}: file not found (a Gemma 4 tokenizer.json is required)")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _content(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _special_token_texts(config: dict) -> list[str]:
    """transformers' `all_special_tokens` for this config, in its order."""
    named: dict[str, str | None] = {}
    gemma = str(config.get("tokenizer_class", "")).startswith("Gemma")
    for typ in _STANDARD:
        key = f"{typ}_token"
        named[key] = _content(config[key]) if key in config else (_GEMMA_DEFAULTS.get(typ) if gemma else None)
    for key, value in config.items():
        if key.endswith("_token") and key not in named and isinstance(value, str):
            named[key] = value
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):
        named.update({k: _content(v) for k, v in extra.items()})
        extra = []
    texts = [t for t in named.values() if t] + [t for t in map(_content, extra) if t]
    return list(dict.fromkeys(texts))


def _vocab(path: Path, tok: dict, config: dict) -> tuple[list[str], list[int]]:
    """Token texts and types by id, as LlamaHfVocab.all_tokens() yields them."""
    model = tok["model"]
    base: dict[str, int] = model.get("vocab") or {}
    added = sorted(((a["content"], int(a["id"])) for a in tok.get("added_tokens") or []), key=lambda x: x[1])
    full = dict(base) | dict(added)
    by_id = {i: t for t, i in base.items()} | {i: t for t, i in added}
    special_ids = {full[t] for t in _special_token_texts(config) if t in full}
    n_base = len(base)
    missing = [i for i in range(n_base) if i not in by_id]
    if missing:
        raise ValueError(f"{path}: vocabulary has no token with id {missing[0]}")

    def kind(i: int, text: str) -> int:
        if _BYTE_TOKEN.fullmatch(text):
            return TokenType.BYTE
        return TokenType.CONTROL if i in special_ids else TokenType.NORMAL

    tokens = [by_id[i] for i in range(n_base)]
    types = [kind(i, t) for i, t in enumerate(tokens)]
    for text, i in added:
        if i >= n_base:
            tokens.append(text)
            types.append(TokenType.CONTROL if i in special_ids else TokenType.USER_DEFINED)
    types = [TokenType.USER_DEFINED if t in GEMMA4_VISIBLE else k for t, k in zip(tokens, types)]
    return tokens, [int(k) for k in types]


def _merges(path: Path, tok: dict) -> list[str]:
    merges = tok["model"].get("merges")
    if not isinstance(merges, list) or not merges:
        return _merges_txt(path.parent / "merges.txt")
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        # GGUF merges are "a b" strings, so a space inside a part is shifted by 256 (to 'Ġ')
        return [" ".join(p.replace(" ", chr(ord(" ") + 256)) for p in pair) for pair in merges]
    raise ValueError(f"{path}: unknown format of model.merges")


def _merges_txt(path: Path) -> list[str]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    return [" ".join(parts) for parts in (ln.split(None, 3) for ln in lines) if len(parts) == 2]


class _Specials:
    """SpecialVocab's findings: special ids, add_* flags (both in insertion order), template."""

    def __init__(self, folder: Path, tok: dict, config: dict | None, config_json: dict | None):
        self.folder = folder
        self.types: list[str] = list(_STANDARD)
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.template: str | list | None = None
        # without a tokenizer_config.json gguf-py still reads the post-processor, then stops
        cfg = dict(config or {})
        self._post_processor(tok.get("post_processor"), cfg)
        if cfg:
            self._from_config(cfg, tok.get("added_tokens") or [])
        if config_json:
            for typ in self.types:
                tid = config_json.get(f"{typ}_token_id")
                if tid is None and "text_config" in config_json:
                    tid = config_json["text_config"].get(f"{typ}_token_id")
                self._set_id(typ, tid, "config.json")

    def _set_id(self, typ: str, tid: Any, source: str) -> None:
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise ValueError(f"{self.folder / source}: invalid id {tid} for the {typ} token")
        self.ids.setdefault(typ, tid)

    def _post_processor(self, pp: dict | None, cfg: dict) -> None:
        # SpecialVocab guesses add_bos/add_eos/add_sep from the tokenizers post-processor; it
        # only understands simple templates, and we copy its guesses, odd cases included.
        n = {k: cfg.get(f"{k}_token") for k in ("bos", "cls", "eos", "sep")}
        if not n["bos"] and n["cls"] and cfg:
            cfg["bos_token"] = n["bos"] = n["cls"]
        if not n["eos"] and n["sep"] and cfg:
            cfg["eos_token"] = n["eos"] = n["sep"]
        for proc in (pp or {}).get("processors", [pp] if pp else []):
            if proc.get("type") == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not n["cls"] and cfg:
                    cfg["cls_token"] = n["cls"] = proc.get("cls", [n["bos"]])[0]
                if not n["sep"] and cfg:
                    cfg["sep_token"] = n["sep"] = proc.get("sep", [n["eos"]])[0]
            elif proc.get("type") == "TemplateProcessing":
                self._template(proc, cfg, n)

    def _template(self, proc: dict, cfg: dict, n: dict) -> None:
        single, pair = proc.get("single", []), proc.get("pair", [])

        def special(item: dict) -> Any:
            return item.get("SpecialToken", {}).get("id")

        first = last = None
        if len(single) > 1:
            if first := special(single[0]):
                if not cfg:
                    n["bos"] = first
                self.add["bos"] = first in (n["bos"], n["cls"])
            if last := special(single[-1]):
                if not cfg:
                    n["eos"] = last
                elif last != n["eos"]:
                    # the config's eos becomes eot (or eom) and the template's last token eos
                    for extra in ("eot", "eom"):
                        if extra not in self.types:
                            self.types.append(extra)
                            cfg[f"{extra}_token"] = n["eos"]
                            break
                    cfg["eos_token"] = n["eos"] = last
                self.add["eos"] = last == n["eos"]
        if not pair:
            return
        start = 1 if first and special(pair[0]) == first else 0
        stop = -1 if last and special(pair[-1]) == last else None
        pair = pair[start:stop]
        if not pair:
            return
        a, b = pair[0].get("Sequence", {}).get("id"), pair[-1].get("Sequence", {}).get("id")
        middle = pair[1:-1]
        if a != "A" or b != "B" or not middle:
            return
        entry = special(middle[0])
        add_sep = bool(entry and entry in (n["sep"], n["eos"]) and not last)
        if len(middle) == 2 and (entry := special(middle[1])) and entry in (n["sep"], n["eos"]):
            add_sep = True
        self.add["sep"] = add_sep
        if add_sep and not n["sep"] and cfg:
            cfg["sep_token"] = n["eos"]

    def _from_config(self, cfg: dict, added_tokens: list[dict]) -> None:
        self.template = cfg.get("chat_template", self._template_files())
        if self.template is not None and not isinstance(self.template, (str, list)):
            self.template = None  # gguf-py ignores a template of any other type
        for typ in self.types:
            flag = cfg.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                self.add[typ] = flag
            text = _content(cfg.get(f"{typ}_token"))
            if text is not None:
                tid = next((a.get("id") for a in added_tokens if a.get("content") == text), None)
                self._set_id(typ, tid, "tokenizer.json")

    def _template_files(self) -> str | list | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            default = jinja.read_text(encoding="utf-8")
            more = sorted((self.folder / "additional_chat_templates").glob("*.jinja"))
            if not more:
                return default
            return [{"name": "default", "template": default}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in more]
        data = _read_json(self.folder / "chat_template.json", required=False)
        return data.get("chat_template") if isinstance(data, dict) else None


def _template_kv(template: str | list) -> list[KV]:
    if isinstance(template, str):
        return [(T.CHAT_TEMPLATE, template, "str")]
    out: list[KV] = []
    default, names = None, []
    for choice in template:
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in choice.get("name", ""))
        if not name or choice.get("template") is None:
            continue
        if name == "default":
            default = choice["template"]
        else:
            names.append(name)
            out.append((T.CHAT_TEMPLATE_N.format(name=name), choice["template"], "str"))
    if names:  # gguf-py writes these from a set, so its order is arbitrary; ours is file order
        out.append((T.CHAT_TEMPLATES, list(dict.fromkeys(names)), "str[]"))
    if default is not None:
        out.append((T.CHAT_TEMPLATE, default, "str"))
    return out


def tokenizer_kv(src_dir: Path) -> list[KV]:
    """The tokenizer keys, in the order llama.cpp's Gemma4 converter writes them."""
    src_dir = Path(src_dir)
    tok_path = src_dir / "tokenizer.json"
    tok = _read_json(tok_path, required=True)
    model = tok.get("model") if isinstance(tok, dict) else None
    decoder = tok.get("decoder") if isinstance(tok, dict) else None
    if not (isinstance(model, dict) and model.get("type") == "BPE" and model.get("byte_fallback")
            and isinstance(decoder, dict) and decoder.get("type") == "Sequence"):
        raise ValueError(f"{tok_path}: not a Gemma-style tokenizer (needs a BPE model with byte_fallback "
                         "and a Sequence decoder)")
    config = _read_json(src_dir / "tokenizer_config.json", required=False)
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{src_dir / 'tokenizer_config.json'}: expected a JSON object")
    config_json = _read_json(src_dir / "config.json", required=False)
    if config_json is not None and not isinstance(config_json, dict):
        raise ValueError(f"{src_dir / 'config.json'}: expected a JSON object")

    try:
        tokens, types = _vocab(tok_path, tok, config or {})
        merges = _merges(tok_path, tok)
    except (KeyError, TypeError, AttributeError) as e:  # a field missing or of the wrong kind
        raise ValueError(f"{tok_path}: malformed vocabulary ({type(e).__name__}: {e})") from None
    specials = _Specials(src_dir, tok, config, config_json)

    kv: dict[str, tuple[Any, str]] = {}  # a later write keeps the first one's place, as GGUFWriter does
    kv[T.MODEL] = ("gemma4", "str")
    kv[T.LIST] = (tokens, "str[]")
    kv[T.SCORES] = ([-1000.0] * len(tokens), "f32[]")
    kv[T.TOKEN_TYPE] = (types, "i32[]")
    if merges:
        kv[T.MERGES] = (merges, "str[]")
    for typ, tid in specials.ids.items():
        if typ in _ID_KEYS:
            kv[_ID_KEYS[typ]] = (tid, "u32")
    for typ, flag in specials.add.items():
        if typ in _ADD_KEYS:
            kv[_ADD_KEYS[typ]] = (flag, "bool")
    if specials.template is not None:
        for key, value, vtype in _template_kv(specials.template):
            kv[key] = (value, vtype)
    kv[T.ADD_PREFIX] = (False, "bool")
    kv[T.ADD_BOS] = (True, "bool")
    return [(k, v, t) for k, (v, t) in kv.items()]


__all__ = ["GEMMA4_VISIBLE", "tokenizer_kv"]
