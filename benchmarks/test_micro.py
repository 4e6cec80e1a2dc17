"""pytest-benchmark micro-benchmarks of the hot pure-Python paths.

    .venv/bin/python -m pytest benchmarks/test_micro.py --benchmark-only
"""

from __future__ import annotations

import random

import pytest

from runner.engine.slots import SlotCache
from runner.engine.textstream import TextStream


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


# -- wire messages (runner/process/protocol.py): the per-token path and the request path --------

def _completion_request() -> dict:
    return {"op": "completion", "id": 12345, "prompt": "Write a story about a lighthouse keeper. " * 8,
            "options": {"num_predict": 128, "temperature": 0.7, "top_k": 40, "top_p": 0.9,
                        "stop": ["</s>", "\n\nUser:"], "seed": 42},
            "add_special": True}


def test_encode_chunk_reply(benchmark):
    from runner.process import protocol as P

    reply = P.ChunkReply(id=12345, text=" lighthouse", tokens=[28431])
    assert P.decode_reply(benchmark(P.encode, reply)) == reply


def test_decode_chunk_reply(benchmark):
    from runner.process import protocol as P

    data = P.encode(P.ChunkReply(id=12345, text=" lighthouse", tokens=[28431]))
    assert benchmark(P.decode_reply, data).tokens == [28431]


def test_encode_decode_final_reply(benchmark):
    from runner.process import protocol as P

    reply = P.FinalReply(id=12345, done_reason="length", prompt_eval_count=64,
                         prompt_eval_duration=0.21, eval_count=128, eval_duration=1.07,
                         cached_count=32, prompt_count=96, slot=3)
    assert benchmark(lambda: P.decode_reply(P.encode(reply))) == reply


def test_encode_completion_request(benchmark):
    from runner.process import protocol as P

    request = _completion_request()
    assert len(benchmark(P.encode, request)) > 300


def test_decode_completion_request(benchmark):
    from runner.process import protocol as P

    data = P.encode(_completion_request())
    assert benchmark(P.decode_request, data).options["num_predict"] == 128


def test_decode_token_id_prompt_2k(benchmark):
    from runner.process import protocol as P

    data = P.encode({"op": "completion", "id": 1, "prompt": list(range(1000, 3000))})
    assert len(benchmark(P.decode_request, data).prompt) == 2000


def test_refuse_bad_request(benchmark):
    """The slow path: a request that fails validation is decoded twice to name its id."""
    from runner.process import protocol as P

    data = P.encode({**_completion_request(), "options": "not a map"})

    def refuse():
        try:
            P.decode_request(data)
        except P.ProtocolError as exc:
            return exc.request_id

    assert benchmark(refuse) == 12345
