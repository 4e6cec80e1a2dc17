"""pytest-benchmark micro-benchmarks of the hot pure-Python paths.

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-only
"""

from __future__ import annotations

import random

import pytest

from runner.slots import SlotCache
from runner.textstream import TextStream


class NullKV:
    def seq_rm(self, seq, p0, p1):
        return True

    def seq_cp(self, src, dst, p0, p1):
        pass

    def seq_add(self, seq, p0, p1, delta):
        pass

    def can_shift(self):
        return True


@pytest.mark.parametrize("policy", ["single", "multi"])
def test_slot_selection_8_slots_8k(benchmark, policy):
    rng = random.Random(0)
    cache = SlotCache(NullKV(), 8, 8192, policy)
    shared = [rng.randrange(50000) for _ in range(6000)]
    for slot in cache.slots:
        slot.inputs = shared[:rng.randrange(1000, 6000)] + [rng.randrange(50000) for _ in range(2000)]
    prompt = shared + [rng.randrange(50000) for _ in range(2000)]

    def select():
        slot, n = cache.acquire(prompt)
        cache.release(slot, None)
        slot.inputs = shared[:5000] + [1] * 2000  # restore a comparable state
        return n

    benchmark(select)


def test_stop_string_scanning(benchmark):
    pieces = [f" word{i}".encode() for i in range(1000)]

    def scan():
        stream = TextStream(["</answer>", "\n\nUser:", "STOP"])
        out = [stream.feed(p) for p in pieces]
        out.append(stream.finish())
        return out

    benchmark(scan)


def test_detokenize_with_utf8_holdback(benchmark):
    text = "héllo wörld 東京 👍🏽 " * 100
    data = text.encode()
    pieces = [data[i:i + 3] for i in range(0, len(data), 3)]  # splits multibyte characters

    def run():
        stream = TextStream()
        return "".join(stream.feed(p) for p in pieces) + stream.finish()

    assert benchmark(run) == text


def test_batch_building(benchmark):
    from runner import _llama

    tokens = list(range(100, 612))
    with _llama.Batch(512, n_seq_max=1) as batch:
        def build():
            batch.clear()
            for seq in range(8):
                batch.add(1000 + seq, 100, seq, True)
            batch.add_tokens(tokens[:504], 0, 0, output_last=True)
            return len(batch)

        assert benchmark(build) == 512
