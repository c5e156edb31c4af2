"""Text <-> token ids for a Gemma 4 GGUF, built from its `tokenizer.ggml.*` keys alone.

The GGUF carries the token texts, their types and the BPE merges; the rest of llama.cpp's gemma4
vocabulary (spaces become '▁', byte fallback for anything outside the vocabulary, the decoder
chain) is fixed by the tokenizer model name, so it is rebuilt here as a HF `tokenizers` pipeline.
Control and user-defined tokens are added tokens, so `<|turn>` in a prompt is one id, not seven.

Chat templates come from the file, which means from whoever made the file: they are rendered in
jinja2's immutable sandbox, and a template that is missing or fails falls back to the built-in
Gemma 4 turn layout (diffusiongemma-arch.md 5.7).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

SPACE = "\u2581"
# llama.cpp's end-of-generation texts for gemma4 (llama-vocab.cpp), beside the eos id itself
_EOG_TEXTS = ("<eos>", "<turn|>", "<|tool_response>")
_MERGE_SPACE = chr(ord(" ") + 256)  # how gguf-py stores a space inside a merge part


class GGUFTokenizer:
    def __init__(self, tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], *,
                 bos_id: int | None, eos_id: int | None, unk_id: int | None = None,
                 extra_eos: Sequence[int] = (), chat_template: str | None = None, add_bos: bool = True):
        self.tokens = list(tokens)
        self.types = [int(t) for t in types] if types else [int(TokenType.NORMAL)] * len(self.tokens)
        if len(self.types) != len(self.tokens):
            raise ValueError(f"tokenizer has {len(self.tokens)} tokens but {len(self.types)} token types")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.chat_template = chat_template
        index = {t: i for i, t in reversed(list(enumerate(self.tokens)))}  # first id wins, as in llama.cpp
        eog = [eos_id, *extra_eos, *(index.get(t) for t in _EOG_TEXTS)]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eog if i is not None))
        self._tok = self._build(index, merges, unk_id)
        self._env: Any = None

    @classmethod
    def from_kv(cls, kv: Mapping[str, Any]) -> GGUFTokenizer:
        """From GGUF key/values (plain Python values), e.g. `GGUFFile(path).kv`."""
        tokens = kv.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF has no tokenizer.ggml.tokens: it carries no vocabulary")
        model = kv.get("tokenizer.ggml.model", "gemma4")
        if model != "gemma4":
            raise ValueError(f"tokenizer.ggml.model is {model!r}; only the gemma4 vocabulary is supported")

        def ident(key: str) -> int | None:
            v = kv.get(f"tokenizer.ggml.{key}")
            return None if v is None else int(v)

        bos = ident("bos_token_id")
        if bos is None and "<bos>" in tokens:
            bos = list(tokens).index("<bos>")
        extra = [i for i in (ident("eot_token_id"), ident("eom_token_id")) if i is not None]
        return cls(list(tokens), list(kv.get("tokenizer.ggml.token_type") or []),
                   list(kv.get("tokenizer.ggml.merges") or []), bos_id=bos, eos_id=ident("eos_token_id"),
                   unk_id=ident("unknown_token_id"), extra_eos=extra,
                   chat_template=kv.get("tokenizer.chat_template"),
                   add_bos=bool(kv.get("tokenizer.ggml.add_bos_token", True)))

    def _build(self, index: dict[str, int], merges: Sequence[str], unk_id: int | None) -> Tokenizer:
        pairs = []
        for n, m in enumerate(merges):
            cut = m.find(" ", 1)  # llama.cpp's rule: a part may itself start with a space
            if cut < 0:
                raise ValueError(f"tokenizer.ggml.merges[{n}] = {m!r} is not two tokens")
            a, b = (p if p in index else p.replace(_MERGE_SPACE, " ") for p in (m[:cut], m[cut + 1:]))
            if a not in index or b not in index or a + b not in index:
                raise ValueError(f"tokenizer.ggml.merges[{n}] = {m!r} names a token not in the vocabulary")
            pairs.append((a, b))
        unk = self.tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(self.tokens) else None
        tok = Tokenizer(BPE(vocab=index, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        # Both kinds are matched whole in raw text; only control tokens are hidden when decoding,
        # user-defined ones (the channel and tool markers) are always shown, as in llama.cpp.
        control = [t for t, k in zip(self.tokens, self.types) if k == TokenType.CONTROL]
        visible = [t for t, k in zip(self.tokens, self.types) if k == TokenType.USER_DEFINED]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in visible])
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def raw(self, text: str) -> list[int]:
        """A plain prompt, no chat turns: the text after <bos>."""
        return self.encode(text, add_bos=True)

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True, keep_control: bool = False) -> str:
        ids = [int(i) for i in ids]
        if stop_at_eos:
            eos = set(self.eos_ids)
            ids = ids[:next((n for n, i in enumerate(ids) if i in eos), len(ids))]
        return self._tok.decode(ids, skip_special_tokens=not keep_control)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], think: bool = False,
                    add_generation_prompt: bool = True) -> str:
        """The prompt text: the file's template if it renders, otherwise the built-in layout."""
        if self.chat_template:
            try:
                return self._render(self.chat_template, messages, think, add_generation_prompt)
            except Exception as e:  # noqa: BLE001 - any template failure means: use the known layout
                logger.warning("chat template in the GGUF failed (%s: %s); using the built-in Gemma 4 "
                               "layout", type(e).__name__, e)
        return gemma4_chat(messages, think, add_generation_prompt, self._text(self.bos_id, "<bos>"))

    def apply_chat(self, messages: Sequence[Mapping[str, Any]], think: bool = False,
                   add_generation_prompt: bool = True) -> list[int]:
        ids = self.encode(self.render_chat(messages, think, add_generation_prompt))
        # a template that leaves <bos> to the tokenizer gets it here, as llama.cpp would add it
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _text(self, i: int | None, default: str) -> str:
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else default

    def _render(self, source: str, messages: Sequence[Mapping[str, Any]], think: bool,
                add_generation_prompt: bool) -> str:
        if self._env is None:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols

            from .template_guard import BoundedSandbox

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            # the same switches and helpers transformers gives chat templates, so that released
            # templates render the same text; the sandbox keeps them away from Python internals
            env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._env = env
        from .template_guard import TemplateLimitError, render_limits

        with render_limits():  # bounded time and memory: the template comes from the file
            out = self._env.from_string(source).render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                enable_thinking=think, tools=None, documents=None,
                bos_token=self._text(self.bos_id, "<bos>"), eos_token=self._text(self.eos_id, "<eos>"))
        if not isinstance(out, str):
            raise TypeError("template did not render to text")
        if len(out) > 4 * sum(len(str(m.get("content", ""))) for m in messages) + (1 << 18):
            raise TemplateLimitError(f"template rendered {len(out)} characters for a short conversation")
        return out


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content.strip()
    parts = content or []
    return "".join(str(p.get("text", "")).strip() for p in parts if isinstance(p, Mapping) and p.get("type") == "text")


def gemma4_chat(messages: Sequence[Mapping[str, Any]], think: bool = False, add_generation_prompt: bool = True,
                bos: str = "<bos>") -> str:
    """The Gemma 4 turn layout without Jinja: <bos>, an optional system turn (with <|think|> when
    thinking), `<|turn>{role}\\n...<turn|>\\n` per message, then `<|turn>model\\n` and, when not
    thinking, the empty thought channel that tells the model to answer directly."""
    out = [bos]
    turns = list(messages)
    system = None
    if turns and turns[0].get("role") == "system":
        system = _content_text(turns.pop(0).get("content"))
    if think or system is not None:
        out.append("<|turn>system\n" + ("<|think|>\n" if think else "") + (system or "") + "<turn|>\n")
    for m in turns:
        role = "model" if m.get("role") == "assistant" else str(m.get("role", "user"))
        out.append(f"<|turn>{role}\n{_content_text(m.get('content'))}<turn|>\n")
    if add_generation_prompt:
        out.append("<|turn>model\n" + ("" if think else "<|channel>thought\n<channel|>"))
    return "".join(out)


__all__ = ["GGUFTokenizer", "gemma4_chat"]
