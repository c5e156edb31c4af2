"""Fuzzing the GGUF reader (GGUFFile: validate_gguf, then gguf-py) and the safetensors reader.

Hypothesis mutates valid tiny files (bit flips, byte and word overwrites with boundary values,
truncation, insertion and deletion, and targeted rewrites of the counts, lengths, dimensions, types
and offsets the file's own layout locates; for safetensors also structural rewrites of the JSON
header). Every mutated file must either parse, and then read back within bounds, or raise our
one-line error type (GGUFError / CheckpointError): never another exception, never more than
EXAMPLE_SECONDS, never a resident-set growth beyond MAX_RSS_GROWTH (and the whole run sits under an
address-space limit, so a huge allocation fails loudly instead of swapping the machine).

Default suite: a short budget (SHORT_EXAMPLES per reader, ~10 s each). Long mode:

    DIFFGEMMA_FUZZ_EXAMPLES=10000 python -m pytest -m slow tests/security/test_fuzz.py -s

(set DIFFGEMMA_FUZZ_REPORT=path.json to get the counts and times as JSON; see RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_tools.inspect_gguf import summarize
from gguf_tools.reader import GGUFError, GGUFFile
from gguf_tools.safetensors_io import Checkpoint, CheckpointError
from tests.security.make_corpus import base_kv, base_tensors, gguf

CORPUS = Path(__file__).resolve().parent / "corpus"
SHORT_EXAMPLES = {"gguf": 1000, "safetensors": 1200}
LONG_EXAMPLES = int(os.environ.get("DIFFGEMMA_FUZZ_EXAMPLES", "10000"))
EXAMPLE_SECONDS = 5
MAX_RSS_GROWTH = 256 << 20
ADDRESS_SPACE_HEADROOM = 4 << 30

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 1023, 4096, 65535, 65536,
               2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53, 2**62, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]


# ---- seeds and the positions of their fields -------------------------------------------------------

def gguf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every count, length, type, dimension and offset in a valid GGUF header."""
    out = [(4, 4), (8, 8), (16, 8)]
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string() -> None:
        nonlocal pos
        out.append((pos, 8))
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    for _ in range(n_kv):
        string()
        out.append((pos, 4))
        (vt,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vt == 8:
            string()
        elif vt == 9:
            out += [(pos, 4), (pos + 4, 8)]
            et, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for i in range(n):
                if et == 8:
                    if i < 4 or i == n - 1:
                        string()
                    else:
                        (ln,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + ln
                else:
                    pos += sizes[et]
        else:
            out.append((pos, sizes[vt]))
            pos += sizes[vt]
    for _ in range(n_tensors):
        string()
        out.append((pos, 4))
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4
        out += [(pos + 8 * i, 8) for i in range(nd)]
        pos += 8 * nd
        out += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return out


def gguf_seeds() -> list[tuple[bytes, list[tuple[int, int]]]]:
    seeds = [gguf(base_kv(), base_tensors()), (CORPUS / "micro.gguf").read_bytes()]
    return [(s, gguf_fields(s)) for s in seeds]


def safetensors_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    tensors = {"model.decoder.embed_tokens.weight": ("BF16", [6, 4]), "model.decoder.norm.weight": ("F32", [4]),
               "model.decoder.layers.0.mlp.up_proj.weight": ("F16", [2, 3, 4])}
    header, blobs, pos = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        blob = rng.standard_normal(n // 2).astype("<f2").tobytes()
        blobs.append(blob)
        pos += n
    raw = json.dumps(header).encode()
    padded = raw + b" " * (-len(raw) % 8)  # what the safetensors library writes
    body = b"".join(blobs)
    return [struct.pack("<Q", len(raw)) + raw + body, struct.pack("<Q", len(padded)) + padded + body]


# ---- mutations ------------------------------------------------------------------------------------------

def _value(draw: Callable, width: int) -> int:
    v = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)))
    return v & ((1 << (8 * width)) - 1)


@st.composite
def byte_mutations(draw: Callable, data: bytes, fields: list[tuple[int, int]], header_end: int) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        op = draw(st.sampled_from(["field", "field", "flip", "word", "truncate", "insert", "delete", "zero", "data"]))
        near = min(len(buf) - 1, header_end + 64)
        pos = draw(st.one_of(st.integers(0, near), st.integers(0, len(buf) - 1)))
        if op == "field" and fields:
            off, width = draw(st.sampled_from(fields))
            if off + width <= len(buf):
                buf[off:off + width] = _value(draw, width).to_bytes(width, "little")
        elif op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "word":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            buf[pos:pos + width] = _value(draw, width).to_bytes(width, "little")[: len(buf) - pos]
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf) - 1)):]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 16))]
        elif op == "data" and header_end < len(buf):  # tensor bytes only: the file still parses
            i = draw(st.integers(header_end, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "zero":
            buf[pos:pos + draw(st.integers(1, 64))] = b"\0" * min(64, len(buf) - pos)
    return bytes(buf)


def gguf_inputs() -> st.SearchStrategy[bytes]:
    seeds = gguf_seeds()

    def header_end(data: bytes, fields: list[tuple[int, int]]) -> int:
        return fields[-1][0] + fields[-1][1]

    return st.one_of(*[byte_mutations(s, f, header_end(s, f)) for s, f in seeds])


@st.composite
def json_mutations(draw: Callable, data: bytes) -> bytes:
    """Rewrite the parsed header: dtypes, shapes, offsets and names get other (often hostile) values."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        entry = header.get(name)
        if not isinstance(entry, dict):
            entry = header[name] = {}
        what = draw(st.sampled_from(["dtype", "shape", "dim", "offset", "offsets", "entry", "name", "metadata",
                                     "body"]))
        big = st.one_of(st.sampled_from(INTERESTING), st.integers(-(2**70), 2**70))
        junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=8), big,
                         st.lists(big, max_size=3))
        if what == "dtype":
            entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "I8", "F64", "", "bf16", 5]))
        elif what == "shape":
            entry["shape"] = draw(st.one_of(st.lists(big, max_size=10), junk))
        elif what == "dim" and isinstance(entry.get("shape"), list) and entry["shape"]:
            entry["shape"][draw(st.integers(0, len(entry["shape"]) - 1))] = draw(big)
        elif what == "offset" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            entry["data_offsets"][draw(st.integers(0, len(entry["data_offsets"]) - 1))] = draw(big)
        elif what == "offsets":
            entry["data_offsets"] = draw(st.one_of(st.lists(big, max_size=3), junk))
        elif what == "entry":
            header[name] = draw(junk)
        elif what == "name":
            header[draw(st.text(max_size=12))] = header.pop(name)
            names = [k for k in header if k != "__metadata__"] or names
        elif what == "metadata":
            header["__metadata__"] = draw(junk)
        elif what == "body":
            cut = draw(st.integers(0, len(body)))
            body = body[:cut] + draw(st.binary(max_size=8))
    raw = json.dumps(header).encode()
    n_field = draw(st.one_of(st.just(len(raw)), st.just(len(raw)), st.sampled_from(INTERESTING)))
    return struct.pack("<Q", n_field & (2**64 - 1)) + raw + body


def safetensors_inputs() -> st.SearchStrategy[bytes]:
    seeds = safetensors_seeds()
    bytewise = [byte_mutations(s, [(0, 8)], 8 + struct.unpack_from("<Q", s)[0]) for s in seeds]
    return st.one_of(*bytewise, *[json_mutations(s) for s in seeds])


# ---- the properties ---------------------------------------------------------------------------------------

class Stats:
    def __init__(self, name: str):
        self.name, self.examples, self.parsed, self.errors = name, 0, 0, Counter()
        self.start = time.perf_counter()
        self.slowest = 0.0

    def report(self) -> dict:
        return {"reader": self.name, "examples": self.examples, "parsed": self.parsed,
                "rejected": self.examples - self.parsed, "seconds": round(time.perf_counter() - self.start, 1),
                "slowest_example_s": round(self.slowest, 3), "error_kinds": len(self.errors)}


class _Timeout(BaseException):  # noqa: N818
    pass


@contextmanager
def guarded() -> Iterator[None]:
    """An address-space cap for the whole run (a huge allocation raises instead of swapping) and an
    alarm per example (a hang fails the test instead of stalling the suite)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        vsize = int(fh.read().split()[0]) * resource.getpagesize()
    cap = vsize + ADDRESS_SPACE_HEADROOM
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

    def alarm(signum, frame):
        raise _Timeout(f"example took more than {EXAMPLE_SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_example(stats: Stats, rss0: int, fn: Callable[[], None], error: type[Exception]) -> None:
    stats.examples += 1
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_SECONDS)
    try:
        fn()
        stats.parsed += 1
    except error as e:
        msg = str(e)
        assert msg and "\n" not in msg and len(msg) < 1000, repr(msg[:300])
        stats.errors[msg.split(": ", 1)[-1][:40]] += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    stats.slowest = max(stats.slowest, time.perf_counter() - t0)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    assert grown < MAX_RSS_GROWTH, f"resident set grew by {grown >> 20} MiB"


def read_gguf(path: Path) -> None:
    f = GGUFFile(path)
    for t in f.tensors.values():  # every tensor view lies inside the file: touch its first and last byte
        flat = np.asarray(t.data).reshape(-1).view(np.uint8)
        if flat.size:
            int(flat[0]) + int(flat[-1])
    summarize(f)  # what `inspect` prints
    if f.architecture in ("diffusion-gemma", "gemma4"):
        f.spec()


def read_safetensors(folder: Path) -> None:
    ckpt = Checkpoint(folder)
    for name, t in ckpt.tensors.items():
        if t.n_rows and t.row_len:
            ckpt.read_rows(name, 0, 1)
            ckpt.read_rows(name, t.n_rows - 1, t.n_rows)


def _fuzz(kind: str, n_examples: int, tmp_path: Path) -> Stats:
    stats = Stats(kind)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    folder = tmp_path / "ckpt"
    folder.mkdir()
    target = tmp_path / "fuzz.gguf" if kind == "gguf" else folder / "model.safetensors"
    strategy = gguf_inputs() if kind == "gguf" else safetensors_inputs()

    @settings(max_examples=n_examples, deadline=None, database=None, derandomize=False, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(data: bytes) -> None:
        target.write_bytes(data)
        if kind == "gguf":
            one_example(stats, rss0, lambda: read_gguf(target), GGUFError)
        else:
            one_example(stats, rss0, lambda: read_safetensors(folder), CheckpointError)

    with guarded():
        prop()
    return stats


def _report(stats: Stats) -> None:
    rep = stats.report()
    print(f"\nfuzz {json.dumps(rep)}")
    out = os.environ.get("DIFFGEMMA_FUZZ_REPORT")
    if out:
        p = Path(out)
        runs = json.loads(p.read_text()) if p.is_file() else []
        p.write_text(json.dumps([*runs, rep], indent=1) + "\n")


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_fuzz_short(kind, tmp_path):
    stats = _fuzz(kind, SHORT_EXAMPLES[kind], tmp_path)
    print(f"\nfuzz {json.dumps(stats.report())}")
    assert stats.examples >= SHORT_EXAMPLES[kind]
    assert 0 < stats.parsed < stats.examples  # the mutations reach both outcomes


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_fuzz_long(kind, tmp_path):
    stats = _fuzz(kind, LONG_EXAMPLES, tmp_path)
    _report(stats)
    assert stats.examples >= LONG_EXAMPLES
