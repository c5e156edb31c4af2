"""A tiny tokenizer in the Gemma 4 layout, for synthetic checkpoints and tests.

The real tokenizer has 262k tokens; the tiny models have a few hundred embedding rows, so this
builds a stand-in with the same *shape*: a `tokenizers` BPE with byte fallback, the SentencePiece
style space handling (spaces become '▁' before BPE), the Gemma decoder chain, and the chat and
control tokens at the ids the real vocabulary uses. Everything downstream (gguf-py's
LlamaHfVocab, transformers' AutoTokenizer, llama.cpp's gemma4 vocabulary, our engine) then reads
it exactly as it reads the real one.

The merges are learned from a short built-in text with a deterministic BPE trainer written here,
so the files are byte-identical across runs and `tokenizers` versions.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

SPACE = "\u2581"  # '▁', SentencePiece's visible space

# Ids follow the real Gemma 4 vocabulary so that hard-coded ids (eos=1, <turn|>=106, ...) in
# llama.cpp, the HF generation config and our engine agree with the tiny models.
SPECIAL_TOKENS: dict[int, str] = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
    50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>",
}
NEWLINE_ID = 107  # "\n" is an ordinary token in Gemma 4, not a control one

# transformers (v5) exposes these as tokenizer attributes; the names are the ones Gemma 4 uses.
NAMED_SPECIALS = {
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>', "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
}

# Gemma 4 turn layout (diffusiongemma-arch.md 5.7). Written for this project, not taken from the
# released template: system turn (with <|think|> first when thinking), one turn per message with
# 'assistant' spelled 'model', then the generation prompt, which closes an empty thought channel
# when thinking is off so the model answers directly.
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- set thinking = enable_thinking is defined and enable_thinking -%}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}\n"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}\n"
    "{%- macro text(content) -%}\n"
    "{%- if content is string -%}{{- content | trim -}}\n"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}{{- part['text'] | trim -}}"
    "{%- endfor -%}{%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- if thinking or system is not none -%}\n"
    "{{- '<|turn>system\\n' -}}{%- if thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}\n"
    "{%- if system is not none -%}{{- text(system) -}}{%- endif -%}{{- '<turn|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for m in turns -%}\n"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}\n"
    "{{- '<|turn>' + role + '\\n' + text(m['content']) + '<turn|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}\n"
    "{%- if not thinking -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}{%- endif -%}\n"
)

# Training text for the merges: plain English with digits and punctuation, plus the role words the
# chat template writes, so that prompts in tests come out as a handful of merged tokens.
_CORPUS = """\
The model reads a prompt and writes an answer one block at a time.
Each block starts as a canvas of mask tokens and the model fills it in over a few steps.
A user asks a question, the system sets the rules, and the model gives the answer.
The thought channel holds the reasoning before the final answer is written.
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100, 256, 1024 and 2048 appear in text.
In 2024 there were 365 days; in 2025 there were 365 days as well, and 12 months in each.
Hello world! How are you today? I am fine, thank you. What is the time? It is 10:30.
Please write a short story about a cat, a dog and a bird that live in the same house.
The quick brown fox jumps over the lazy dog, and then it runs back into the forest.
Tokens are pieces of words; common words become single tokens and rare ones split up.
We convert the weights into a file that other programs can load and run on a laptop.
The answer is correct when the test passes and the output matches the expected result.
Water boils at 100 degrees and freezes at 0 degrees on the Celsius scale.
She said: "This is the first line." He replied: 'And this is the second one.'
Lists (like this one) use commas, colons: semicolons; dashes - and slashes / too.
Code often has brackets [0], braces {x}, angle signs <a> and symbols like # @ $ % ^ & * + = _ ~ |.
user model system thought user model system thought answer question
"""

_ALPHABET = [SPACE] + [chr(c) for c in range(0x21, 0x7F)]  # '▁' and printable ASCII but ' '


def _training_words(corpus: str) -> Counter[tuple[str, ...]]:
    """Split like SentencePiece: a word carries its leading '▁', so merges never cross words."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus.splitlines():
        text = line.replace(" ", SPACE)
        start = 0
        for i in range(1, len(text) + 1):
            if i == len(text) or text[i] == SPACE:
                words[tuple(text[start:i])] += 1
                start = i
    return words


def _learn_merges(n_merges: int, corpus: str) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = _training_words(corpus)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def _minimum_size() -> int:
    return len(SPECIAL_TOKENS) + 1 + 256 + len(_ALPHABET)


def build_vocab(vocab_size: int, corpus: str = _CORPUS) -> tuple[list[str], list[tuple[str, str]]]:
    """Token texts by id and the merges; ids not claimed by a fixed token are filled in order."""
    if vocab_size < _minimum_size():
        raise ValueError(f"tiny tokenizer needs vocab_size >= {_minimum_size()}, got {vocab_size}")
    fixed = dict(SPECIAL_TOKENS)
    fixed[NEWLINE_ID] = "\n"
    pool = [f"<0x{b:02X}>" for b in range(256)] + _ALPHABET
    merges: list[tuple[str, str]] = []
    seen = set(fixed.values()) | set(pool)
    for a, b in _learn_merges(vocab_size - len(fixed) - len(pool), corpus):
        merges.append((a, b))
        if a + b not in seen:
            seen.add(a + b)
            pool.append(a + b)
    # Real Gemma pads its vocabulary with <unusedN> control tokens; so does this one when the
    # corpus runs out of pairs before the requested size is reached.
    pool += [f"<unused{i}>" for i in range(vocab_size - len(fixed) - len(pool))]
    free = iter(pool)
    tokens = [fixed[i] if i in fixed else next(free) for i in range(vocab_size)]
    return tokens, merges


def build_tokenizer(vocab_size: int, corpus: str = _CORPUS) -> Tokenizer:
    tokens, merges = build_vocab(vocab_size, corpus)
    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token="<unk>",
                fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    # After the normalizer there are no ' ' left, so this split is a no-op; it is kept because
    # the released Gemma tokenizer.json carries it and readers may key on it.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    specials = [t for t in tokens if t in SPECIAL_TOKENS.values() or t.startswith("<unused")]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def tokenizer_config(vocab_size: int) -> dict:
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "extra_special_tokens": dict(NAMED_SPECIALS),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "padding_side": "left",
        "tokenizer_class": "GemmaTokenizer",
    }


def write_tiny_tokenizer(dir: Path, vocab_size: int, corpus: str = _CORPUS) -> None:
    """Write tokenizer.json and tokenizer_config.json with exactly `vocab_size` tokens; `corpus`
    is the text the merges are learned from (a task model passes text shaped like its prompts)."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, corpus)
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError("tiny tokenizer size drifted from the requested vocab_size")
    tok.save(str(dir / "tokenizer.json"))
    with open(dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(vocab_size), f, indent=2, ensure_ascii=False)
        f.write("\n")


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer", "build_vocab", "write_tiny_tokenizer"]
