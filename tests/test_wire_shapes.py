"""The engine's events and their wire replies are one shape: Final and
FinalReply, Chunk and ChunkReply carry the same fields (the reply adds the
request id), the server and the client convert field by field, and
docs/protocol.md's completion replies list every field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from runner.engine.requests import Chunk, Final
from runner.process import protocol as P
from runner.process.client import _to_final
from runner.process.server import _final_reply

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def names(dataclass_type) -> set:
    return {f.name for f in dataclasses.fields(dataclass_type)}


def wire_names(struct_type) -> set:
    return set(struct_type.__struct_fields__) - {"id"}


def test_final_and_final_reply_have_the_same_fields():
    assert names(Final) == wire_names(P.FinalReply)


def test_chunk_and_chunk_reply_have_the_same_fields():
    assert names(Chunk) == wire_names(P.ChunkReply)


def test_a_final_crosses_the_wire_unchanged():
    final = Final(done_reason="error", prompt_eval_count=3, prompt_eval_duration=0.25, eval_count=7,
                  eval_duration=1.5, cached_count=2, prompt_count=5, slot=1, error="bad thing",
                  error_code="bad_request", draft_proposed=11, draft_accepted=4)
    for f in dataclasses.fields(Final):  # any field added later must be set here to count
        if f.name != "message":
            assert getattr(final, f.name) != f.default, f"set {f.name} in this test"
    reply = P.decode_reply(P.encode(_final_reply(9, final)))
    assert reply.id == 9
    assert _to_final(reply) == final


def test_the_documented_completion_replies_list_every_field():
    text = DOC.read_text()
    block = text[text.index("#### `completion`"):]
    block = block[block.index("```"):]
    block = block[:block.index("```", 3)]
    final = block[block.index('{type: "final"'):]
    final = final[:final.index("}")]
    chunk = block[block.index('{type: "chunk"'):]
    chunk = chunk[:chunk.index("}")]
    documented = set(re.findall(r"\b([a-z_]+)\b(?=[,?\s]|$)", final)) - {"type", "final", "id"}
    assert wire_names(P.FinalReply) <= documented | {"message"}, "message is documented with chat"
    assert wire_names(P.ChunkReply) <= set(re.findall(r"[a-z_]+", chunk))


def _documented_reply(op: str, reply_type: str) -> set:
    """The field names docs/protocol.md's block for ``op`` lists in its reply."""
    text = DOC.read_text()
    block = text[text.index(f"#### `{op}`"):]
    block = block[block.index("```"):]
    block = block[:block.index("```", 3)]
    reply = block[block.index(f'{{type: "{reply_type}"'):]
    return set(re.findall(r"[a-z_]+", reply[:reply.index("}")])) - {"type", reply_type}


def test_the_documented_info_and_metrics_replies_list_every_field():
    assert wire_names(P.InfoReply) <= _documented_reply("info", "info")
    assert wire_names(P.MetricsReply) <= _documented_reply("metrics", "metrics")


def test_a_metrics_reply_without_later_fields_still_decodes():
    """``slot_copies`` came after the first metrics replies: a reply that
    lacks it (an older runner's) decodes, with it empty."""
    import msgspec

    hist = P.Histogram(bounds=[1.0], counts=[0, 0], sum=0.0, count=0)
    reply = P.MetricsReply(id=1, requests={}, prompt_tokens=0, prompt_eval_tokens=0, cached_tokens=0,
                           generated_tokens=0, embeddings=0, steps=0, step_seconds=hist, batch_tokens=hist,
                           queue_seconds=hist, queue_depth=0, running=0, in_flight=0, slot_kv_cells=[],
                           media_cache={}, host_cache={}, load_seconds=1.0,
                           slot_copies={"touched": 2, "short": 1, "fresh": 0})
    assert P.decode_reply(P.encode(reply)) == reply
    older = msgspec.msgpack.decode(P.encode(reply))
    del older["slot_copies"]
    decoded = P.decode_reply(msgspec.msgpack.encode(older))
    assert decoded.slot_copies == {} and decoded.load_seconds == 1.0
    assert decoded.grammar_redraw_seconds is None
