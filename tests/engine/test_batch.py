"""The batched pass against the one-sequence engine: bit for bit, whatever else is in the batch.

Oracle: DiffusionGemmaModel.decode_step / encode (what `diffgemma run` runs), sequence by sequence.
"""

from __future__ import annotations

import pytest
import torch

from engine import weights
from engine.batch import BatchedPass, Segment
from engine.run import load

PROMPT_LENGTHS = (22, 7, 1, 40)


def caches_equal(a, b) -> bool:
    return a.length == b.length and all(
        (x is None and y is None) or torch.equal(x, y)
        for xs, ys in ((a.keys, b.keys), (a.values, b.values)) for x, y in zip(xs, ys))


def check_model(m, threads: int) -> None:
    """Prefill four prompts in one pass (and a long one in chunks), then three rounds of mixed
    passes: decoder segments with and without self-conditioning beside an encoder segment of a
    committed canvas; every output and cache equals the one-sequence engine's."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(threads)
    vocab, c = m.vocab, m.canvas_length
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in PROMPT_LENGTHS]
    refs = [m.new_cache() for _ in prompts]
    for p, cache in zip(prompts, refs):
        m.encode(p, cache)
    bp = BatchedPass(m)
    ours = [m.new_cache() for _ in prompts]
    assert bp.run([Segment(cache, p, encoder=True) for cache, p in zip(ours, prompts)]) == [None] * len(prompts)
    assert all(caches_equal(r, o) for r, o in zip(refs, ours))

    # a 20-token prompt prefilled in chunks of 8, one chunk per pass, beside the others' steps
    long_p = torch.randint(0, vocab, (20,), generator=g)
    long_ref, long_ours = m.new_cache(), m.new_cache()
    m.encode(long_p, long_ref, chunk_size=8)
    chunks = [long_p[s:s + 8] for s in range(0, 20, 8)]

    canvases = [torch.randint(0, vocab, (c,), generator=g) for _ in prompts]
    softs: list = [None] * len(prompts)
    for rnd, temps in enumerate(([0.8, 0.7, 0.5, 0.6], [0.75, 0.75, 0.45, 0.9], [0.5, 0.6, 0.7, 0.8])):
        expected = [m.decode_step(cv, cache, sf, t) for cv, cache, sf, t in zip(canvases, refs, softs, temps)]
        segs = [Segment(cache, cv, soft=sf, temperature=t) for cache, cv, sf, t in zip(ours, canvases, softs, temps)]
        segs.insert(1, Segment(long_ours, chunks[rnd], encoder=True))
        outs = bp.run(segs)
        assert outs[1] is None
        del outs[1]
        for (logits, soft), out in zip(expected, outs):
            assert torch.equal(out.logits, logits)
            assert torch.equal(out.soft, soft)
        softs = [s for _, s in expected]
        softs[rnd % len(softs)] = None  # a canvas at its first step beside the others
    assert caches_equal(long_ref, long_ours)
    # a committed canvas re-encoded (a cache with a past) beside decoder segments
    committed = torch.randint(0, vocab, (c,), generator=g)
    m.encode(committed, refs[0])
    expected = m.decode_step(canvases[1], refs[1], softs[1], 0.6)
    outs = bp.run([Segment(ours[0], committed, encoder=True), Segment(ours[1], canvases[1], soft=softs[1],
                                                                      temperature=0.6)])
    assert caches_equal(refs[0], ours[0])
    assert torch.equal(outs[1].logits, expected[0]) and torch.equal(outs[1].soft, expected[1])


@pytest.fixture(scope="module")
def default_model():
    return load(None, torch.device("cpu")).model


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_default_model_batched_equals_one_sequence(default_model, restore_threads):
    check_model(default_model, 1)


def test_blocked_weights_and_vocabulary_chunks(tiny_gguf, monkeypatch, restore_threads):
    """The BF16 tiny model with matrices dequantized in several blocks (as full-width ones are),
    the embedding table read in several chunks, and 2 threads (the experts shared out among
    worker threads, as on a multi-core CPU)."""
    monkeypatch.setattr(weights, "CPU_BLOCK_BYTES", 4096)
    m = load(tiny_gguf, torch.device("cpu")).model
    m.vocab_chunk = 96
    check_model(m, 2)


def test_decoder_segment_needs_a_temperature(default_model):
    with pytest.raises(ValueError, match="temperature"):
        BatchedPass(default_model).run([Segment(default_model.new_cache(), torch.tensor([1, 2]))])
