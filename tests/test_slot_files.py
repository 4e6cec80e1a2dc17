"""Slots saved to disk and restored (save_slot / restore_slot, runner/engine/slotfile.py).

The format checks run without a model; the engine tests compare the greedy
tokens after a restore with those of the slot that never left, and check
that every refused file leaves the slot as it was.
"""

from __future__ import annotations

import os
import struct

import pytest
from gguf_bytes import write_tiny_llama

from runner.engine import slotfile
from runner.engine.requests import BadRequest, Busy, Chunk, CompletionOptions, CompletionRequest

MODEL = "a" * 64  # a model identity for the format tests


def file_bytes(tokens=(1, 2, 3), state=b"state-bytes", model=MODEL, type_k="f16",
               kv_streams=2) -> bytes:
    header = slotfile.SlotHeader(model=model, model_name="m.gguf", type_k=type_k, type_v="f16",
                                 kv_streams=kv_streams, n_inputs=len(tokens), n_state=len(state))
    return b"".join(slotfile.encode(header, list(tokens), state))


def decode(data: bytes, max_inputs: int = 100) -> slotfile.SlotFile:
    return slotfile.decode(data, model=MODEL, type_k="f16", type_v="f16", kv_streams=2,
                           max_inputs=max_inputs, name="x")


# -- the format, without a model ---------------------------------------------

def test_a_file_round_trips():
    saved = decode(file_bytes(tokens=[5, 0, 2**31 - 1], state=b"\x00\x01\x02"))
    assert saved.tokens == [5, 0, 2**31 - 1]
    assert bytes(saved.state) == b"\x00\x01\x02"
    assert saved.header.n_inputs == 3 and saved.header.model == MODEL


@pytest.mark.parametrize("mangle, message", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:40], "truncated"),
    (lambda d: d[:10], "truncated"),
    (lambda d: d + b"\0", "truncated"),
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "checksum"),           # in the checksum
    (lambda d: d[:-40] + bytes([d[-40] ^ 0x80]) + d[-39:], "checksum"),     # in the state
    (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "format version 2"),
    (lambda d: d[:8] + struct.pack("<I", 0) + d[12:], "format version 0"),
    (lambda d: b"GGUF" + d[4:], "not a llama-runner slot file"),
    (lambda d: b"", "not a llama-runner slot file"),
    (lambda d: d[:12] + struct.pack("<I", 1 << 30) + d[16:], "truncated"),  # header length
])
def test_damaged_files_are_refused_saying_why(mangle, message):
    with pytest.raises(BadRequest, match=message):
        decode(mangle(file_bytes()))


def test_a_file_of_another_model_cache_layout_or_too_long_is_refused():
    with pytest.raises(BadRequest, match="another model"):
        decode(file_bytes(model="b" * 64))
    with pytest.raises(BadRequest, match="q8_0/f16 KV cache"):
        decode(file_bytes(type_k="q8_0"))
    with pytest.raises(BadRequest, match="1 KV stream.*this runner has 2.*parallel=1"):
        decode(file_bytes(kv_streams=1))
    with pytest.raises(BadRequest, match="holds 3 inputs; a slot holds at most 2"):
        decode(file_bytes(), max_inputs=2)


def kv_state(counts: list[int], block: bytes = b"cells", seq: int = 1) -> bytes:
    """A sequence state laid out as an ordinary KV cache writes it: magic,
    sequence, stream count, then per stream its cell count and, when not
    zero, its cells (``block``)."""
    out = struct.pack("<IiI", slotfile.STATE_MAGIC, seq, len(counts))
    for c in counts:
        out += struct.pack("<I", c) + (block if c else b"")
    return out


@pytest.mark.parametrize("counts, n_stream, want", [
    ([0, 7, 0], 1, [7]),
    ([7], 3, [7, 0, 0]),
    ([0, 0, 0, 7], 2, [7, 0]),
    ([7, 0], 2, [7, 0]),
    ([0, 0], 3, [0, 0, 0]),
])
def test_restream_moves_the_one_stream_with_cells(counts, n_stream, want):
    assert slotfile.restream(kv_state(counts), n_stream) == kv_state(want)
    assert slotfile.restream(memoryview(kv_state(counts)), n_stream) == kv_state(want)


@pytest.mark.parametrize("state, message", [
    (b"\0" * 8, "too short"),
    (struct.pack("<IiI", 0x12345678, 0, 1) + struct.pack("<I", 0), "magic"),
    (struct.pack("<IiI", slotfile.STATE_MAGIC, 0, 4) + b"\0" * 8, "announces 4 streams"),
    (kv_state([3, 3]), "more than one stream"),
    (kv_state([3, 0]) + b"\1", "more than one stream"),
    (kv_state([0, 0]) + b"x", "trailing bytes"),
])
def test_restream_refuses_what_is_not_one_stream_of_cells(state, message):
    with pytest.raises(ValueError, match=message):
        slotfile.restream(state, 2)


def test_a_file_from_another_stream_count_is_rewritten_for_an_ordinary_kv_cache():
    data = file_bytes(state=kv_state([0, 0, 5, 0]), kv_streams=4)
    saved = slotfile.decode(data, model=MODEL, type_k="f16", type_v="f16", kv_streams=2,
                            max_inputs=100, plain_kv=True)
    assert bytes(saved.state) == kv_state([5, 0]) and saved.header.kv_streams == 4
    with pytest.raises(BadRequest, match="sliding-window, recurrent or hybrid.*parallel=4"):
        slotfile.decode(data, model=MODEL, type_k="f16", type_v="f16", kv_streams=2,
                        max_inputs=100)
    odd = file_bytes(state=b"not a state at all", kv_streams=4)
    with pytest.raises(BadRequest, match="cannot be moved from 4 to 2 KV streams.*magic"):
        slotfile.decode(odd, model=MODEL, type_k="f16", type_v="f16", kv_streams=2,
                        max_inputs=100, plain_kv=True)


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/etc/passwd", "a\\b", "", ".hidden",
                                  "x" * 129, "a\0b", "caf\u00e9"])
def test_names_that_are_not_plain_file_names_are_refused(name, tmp_path):
    with pytest.raises(BadRequest, match="name: .* is not a plain file name"):
        slotfile.slot_path(str(tmp_path), name)


def test_names_stay_in_the_directory_and_no_directory_means_off(tmp_path):
    assert slotfile.slot_path(str(tmp_path), "chat-1.v2_x") == str(tmp_path / "chat-1.v2_x.slot")
    with pytest.raises(BadRequest, match="slot_save_dir .*--slot-save-dir"):
        slotfile.slot_path(None, "chat")


def test_reads_do_not_follow_symlinks(tmp_path):
    target = tmp_path / "outside.slot"
    target.write_bytes(file_bytes())
    (tmp_path / "dir").mkdir()
    os.symlink(target, tmp_path / "dir" / "link.slot")
    with pytest.raises(BadRequest, match="cannot be opened"):
        slotfile.read_file(str(tmp_path / "dir" / "link.slot"), "link", 1 << 20)
    with pytest.raises(BadRequest, match="no slot file 'nope'"):
        slotfile.read_file(str(tmp_path / "dir" / "nope.slot"), "nope", 1 << 20)


def test_model_identity_is_the_gguf_header_and_the_adapters(tmp_path):
    a = write_tiny_llama(tmp_path / "a.gguf")
    b = write_tiny_llama(tmp_path / "b.gguf", hparams={"context_length": 64})
    assert slotfile.model_identity(str(a)) == slotfile.model_identity(str(a))
    assert slotfile.model_identity(str(a)) != slotfile.model_identity(str(b))
    assert slotfile.model_identity(str(a), [str(b)]) != slotfile.model_identity(str(a))


# -- SlotCache.put, with the slot tests' fake memory ---------------------------

def test_put_replaces_a_free_slot_offers_its_content_to_the_host_tier_and_is_reused():
    from test_hostcache import make
    from test_slots import assert_consistent

    cache, kv, state, host = make(n_slots=2)
    slot, _ = cache.acquire(list(range(30)))
    kv.decode(cache, slot, list(range(30)))
    cache.release(slot)
    saved = state.state_get(slot.id)        # what a saved file would carry
    other = list("abcdefghij")
    kv.kv[1] = dict(enumerate(other))
    cache.slots[1].inputs = list(other)
    kv.kv[0] = {0: "z"}
    cache.slots[0].inputs = ["z"]            # the saved conversation left slot 0
    assert cache.put(cache.slots[1], list(range(30)), lambda: state.state_set(1, saved))
    assert_consistent(cache, kv)
    assert cache.slots[1].inputs == list(range(30))
    assert [list(e.inputs) for e in host._entries] == [other]  # what slot 1 held went to the tier
    got, n = cache.acquire(list(range(30)) + [99])
    assert (got.id, n) == (1, 30)


def test_put_refuses_a_lent_slot_and_reports_a_refused_state():
    from test_hostcache import make
    from test_slots import assert_consistent

    cache, kv, state, _ = make(n_slots=1, refuse=True)
    slot, _ = cache.acquire([1, 2, 3])
    with pytest.raises(ValueError, match="in use"):
        cache.put(slot, [1], lambda: True)
    kv.decode(cache, slot, [1, 2, 3])
    cache.release(slot)
    data = state.state_get(0)
    assert not cache.put(slot, [1, 2, 3], lambda: state.state_set(0, data))
    assert slot.inputs == [] and not slot.in_use
    assert_consistent(cache, kv)


# -- the engine ----------------------------------------------------------------

GREEDY = dict(temperature=0.0, num_predict=10)


def run(engine, prompt, **options):
    events = list(engine.submit(CompletionRequest(
        prompt=prompt, options=CompletionOptions.from_dict({**GREEDY, **options}))))
    return [t for e in events if isinstance(e, Chunk) for t in e.tokens], events[-1]


def prompts(engine):
    a = engine.tokenize("Apples. " + "We talk about apples, at length. " * 20, add_special=True)
    b = engine.tokenize("Bridges. " + "We talk about bridges, at length. " * 20, add_special=True)
    return a, b


@pytest.mark.model
def test_restored_slot_continues_as_if_it_never_left(default_model_path, tmp_path):
    """The second turn of a conversation in an engine whose slot never left
    is the reference.  The same turn after the conversation's slot was
    overwritten and its file restored into the other slot, and in a fresh
    engine (a restarted runner), gives the same tokens with the same reuse."""
    from runner.engine.core import Engine, EngineConfig

    config = EngineConfig(default_model_path, n_ctx=2048, parallel=2, n_threads=2, cache_ram_mb=0,
                          slot_save_dir=str(tmp_path))
    with Engine(config) as ref:
        a, b = prompts(ref)
        reply, first = run(ref, a)
        follow = a + reply + ref.tokenize(" Tell me more.")
        want, kept = run(ref, follow)
    held = len(a) + len(reply) - 1  # the last reply token was returned, never decoded
    assert kept.cached_count == held
    with Engine(config) as e:
        again, again_final = run(e, a)
        assert (again, again_final.slot) == (reply, first.slot)
        saved = e.save_slot(first.slot, "a")
        assert saved.n_inputs == held and saved.n_bytes == os.path.getsize(tmp_path / "a.slot")
        other = 1 - first.slot
        assert run(e, b)[1].slot == other                  # the empty slot
        _, c = run(e, e.tokenize("Comets. " * 30, add_special=True))
        assert c.slot == first.slot                        # a is gone (no host tier)
        restored = e.restore_slot(other, "a")              # over b
        assert restored.n_inputs == held and e.info()["slots"][other]["n_inputs"] == held
        got, final = run(e, follow)
        assert (got, final.cached_count, final.slot) == (want, held, other)
    with Engine(config) as fresh:
        fresh.restore_slot(1, "a")
        got, final = run(fresh, follow)
        assert (got, final.cached_count, final.slot) == (want, held, 1)


@pytest.mark.model
def test_a_file_restores_into_another_parallel_and_kv_unified(default_model_path, tmp_path):
    """A slot saved with 2 KV streams (parallel 2) continues with the greedy
    tokens of the slot that never left in a runner with 1 slot, with 3, and
    with 3 sharing one unified stream; and the files those write restore
    back into 2 streams, continuing as they do where they were written."""
    from runner.engine.core import Engine, EngineConfig

    def config(parallel, **kw):
        return EngineConfig(default_model_path, n_ctx=1024 * parallel, parallel=parallel,
                            n_threads=2, cache_ram_mb=0, slot_save_dir=str(tmp_path), **kw)

    with Engine(config(2)) as e:
        a, _ = prompts(e)
        reply, first = run(e, a)
        e.save_slot(first.slot, "a")
        follow = a + reply + e.tokenize(" Tell me more.")
        want, kept = run(e, follow)              # where it never left
    held = len(a) + len(reply) - 1
    assert kept.cached_count == held
    again = {}
    for name, cfg in [("one", config(1)), ("three", config(3)),
                      ("unified", config(3, kv_unified=True))]:
        with Engine(cfg) as other:
            assert other.restore_slot(cfg.parallel - 1, "a").n_inputs == held
            got, final = run(other, follow)
            assert (got, final.cached_count, final.slot) == (want, held, cfg.parallel - 1), name
            other.save_slot(final.slot, name)
            again[name] = run(other, follow)[0]  # from the slot as saved, cut back by one
    with Engine(config(2)) as back:
        for name in again:
            assert back.restore_slot(0, name).n_inputs == len(follow) + len(want) - 1
            got, final = run(back, follow)
            assert (got, final.cached_count, final.slot) == (again[name], len(follow) - 1, 0), name


@pytest.mark.model
def test_states_are_copied_into_buffers_the_caller_touched_and_restore_alike(
        default_model_path, tmp_path, monkeypatch):
    """save_slot copies the state into a buffer its caller touched: sized
    by the measured bytes per input once there is one, after a round that
    only measures before (no host tier here to have measured it), and into
    fresh memory on the loop when the rounds run out.  The three files are
    byte for byte the same, their state is llama_state_seq_get_data's, and a
    restore over the slot (whose prior state is copied the same way)
    continues with the greedy tokens of the slot that never left."""
    import runner.engine.core
    from runner.engine.core import Engine, EngineConfig

    config = EngineConfig(default_model_path, n_ctx=2048, parallel=2, n_threads=2, cache_ram_mb=0,
                          slot_save_dir=str(tmp_path))
    with Engine(config) as e:
        a, _ = prompts(e)
        reply, first = run(e, a)
        held = len(a) + len(reply) - 1
        assert e.save_slot(first.slot, "a").n_inputs == held
        assert e.slot_copies == {"short": 1, "touched": 1}   # nothing measured yet
        e.save_slot(first.slot, "again")
        assert e.slot_copies == {"short": 1, "touched": 2}   # sized from the first
        monkeypatch.setattr(runner.engine.core, "SLOT_JOB_ROUNDS", 1)
        e._state_bytes_per_input = 0.0
        e.save_slot(first.slot, "fresh")
        assert e.slot_copies == {"short": 1, "touched": 2, "fresh": 1}
        monkeypatch.undo()
        data = (tmp_path / "a.slot").read_bytes()
        assert data == (tmp_path / "again.slot").read_bytes() == (tmp_path / "fresh.slot").read_bytes()
        state = e.ctx.state_seq_get(first.slot)  # the loop is idle
        saved = slotfile.decode(data, model=e._identity, type_k="f16", type_v="f16", kv_streams=2,
                                max_inputs=e.slot_ctx)
        assert bytes(saved.state) == state and saved.header.n_state == len(state)

        follow = a + reply + e.tokenize(" Tell me more.")
        want, kept = run(e, follow)                          # where it never left
        assert (kept.cached_count, kept.slot) == (held, first.slot)
        e.restore_slot(first.slot, "a")                      # over what follow left
        assert e.slot_copies["touched"] == 3 and e.slot_copies["fresh"] == 1
        got, final = run(e, follow)
        assert (got, final.cached_count, final.slot) == (want, held, first.slot)


@pytest.mark.model
def test_a_state_the_memory_refuses_puts_back_what_the_slot_held(default_model_path, tmp_path):
    """A file whose state llama.cpp cannot read (well formed, checksum
    right, the state cut short) is refused after the slot was emptied for
    it; the slot's prior state, copied into the caller's buffer, is put
    back and continues as before."""
    from runner.engine.core import Engine, EngineConfig

    with Engine(EngineConfig(default_model_path, n_ctx=2048, parallel=2, n_threads=2,
                             slot_save_dir=str(tmp_path))) as e:
        a, b = prompts(e)
        _, fa = run(e, a)
        e.save_slot(fa.slot, "a")
        good = slotfile.decode((tmp_path / "a.slot").read_bytes(), model=e._identity, type_k="f16",
                               type_v="f16", kv_streams=2, max_inputs=e.slot_ctx)
        cut = bytes(good.state[:len(good.state) // 2])
        header = slotfile.SlotHeader(**{f: getattr(good.header, f) for f in good.header.__struct_fields__})
        header.n_state = len(cut)
        slotfile.write_atomic(str(tmp_path / "cut.slot"), slotfile.encode(header, good.tokens, cut))
        reply, fb = run(e, b)
        assert fb.slot != fa.slot
        follow = b + reply + e.tokenize(" Go on.")
        want, kept = run(e, follow)
        before = list(e.slots.slots[fb.slot].inputs)
        assert kept.cached_count == len(b) + len(reply) - 1 and len(before) > len(follow)
        touched = e.slot_copies["touched"]
        with pytest.raises(BadRequest, match=f"slot {fb.slot}: the model's memory refused"):
            e.restore_slot(fb.slot, "cut")
        assert e.slot_copies["touched"] == touched + 1 and "fresh" not in e.slot_copies
        assert e.slots.slots[fb.slot].inputs == before
        got, final = run(e, follow)
        assert (got, final.cached_count, final.slot) == (want, len(follow) - 1, fb.slot)


@pytest.mark.model
def test_refused_files_leave_the_slot_as_it_was(default_model_path, tmp_path):
    from runner.engine.core import Engine, EngineConfig

    other = tmp_path / "other"
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    with Engine(EngineConfig(str(tiny), n_ctx=64, n_threads=1, slot_save_dir=str(other))) as t:
        _, f = run(t, [1, 2, 3, 4], num_predict=2)
        t.save_slot(f.slot, "tiny")
    d = tmp_path / "slots"
    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                             slot_save_dir=str(d))) as e:
        a, b = prompts(e)
        _, fa = run(e, a)
        e.save_slot(fa.slot, "a")
        _, fb = run(e, b)                        # the other slot
        assert fb.slot != fa.slot
        good = (d / "a.slot").read_bytes()
        os.replace(other / "tiny.slot", d / "tiny.slot")
        cases = {
            "truncated": (good[:len(good) // 2], "truncated"),
            "flipped": (good[:-1000] + bytes([good[-1000] ^ 1]) + good[-999:], "checksum"),
            "version": (good[:8] + struct.pack("<I", 9) + good[12:], "format version 9"),
            "tiny": (None, "another model"),
        }
        long = slotfile.SlotHeader(model=e._identity, model_name="x", type_k="f16", type_v="f16",
                                   kv_streams=2, n_inputs=e.slot_ctx + 1, n_state=4)
        cases["long"] = (b"".join(slotfile.encode(long, [1] * (e.slot_ctx + 1), b"\0" * 4)),
                         "a slot holds at most")
        before = [list(s.inputs) for s in e.slots.slots]
        for name, (data, message) in cases.items():
            if data is not None:
                (d / f"{name}.slot").write_bytes(data)
            with pytest.raises(BadRequest, match=message):
                e.restore_slot(fb.slot, name)
        for name, message in [("../other/tiny", "not a plain file name"),
                              (str(other / "tiny"), "not a plain file name"),
                              ("missing", "no slot file")]:
            with pytest.raises(BadRequest, match=message):
                e.restore_slot(fb.slot, name)
        with pytest.raises(BadRequest, match="slot: 2 is not a slot"):
            e.restore_slot(2, "a")
        assert [list(s.inputs) for s in e.slots.slots] == before
        # the slot still serves b, and the engine goes on
        _, again = run(e, before[fb.slot] + e.tokenize(" More."))
        assert (again.slot, again.cached_count) == (fb.slot, len(before[fb.slot]))


@pytest.mark.model
def test_a_slot_in_use_is_busy_and_an_empty_one_cannot_be_saved(default_model_path, tmp_path):
    from runner.engine.core import Engine, EngineConfig

    with Engine(EngineConfig(default_model_path, n_ctx=1024, parallel=2, n_threads=2,
                             slot_save_dir=str(tmp_path))) as e:
        a, _ = prompts(e)
        _, short = run(e, a, num_predict=2)
        e.save_slot(short.slot, "pre")
        handle = e.submit(CompletionRequest(prompt=a, options=CompletionOptions.from_dict(
            dict(temperature=0.0, num_predict=400, ignore_eos=True))))
        events = iter(handle)
        first = next(events)
        assert isinstance(first, Chunk)
        busy = [s["id"] for s in e.info()["slots"] if s["in_use"]]
        assert len(busy) == 1
        with pytest.raises(Busy, match="in use"):
            e.save_slot(busy[0], "x")
        with pytest.raises(Busy, match="in use"):
            e.restore_slot(busy[0], "pre")
        with pytest.raises(BadRequest, match="is empty"):
            e.save_slot(1 - busy[0], "x")
        handle.cancel()
        assert list(events)[-1].done_reason == "cancelled"
        assert not (tmp_path / "x.slot").exists()


@pytest.mark.model
def test_the_ops_through_a_runner_process_and_the_cli(default_model_path, tmp_path, capsys):
    from runner.cli import main
    from runner.engine.requests import BadRequest as Refused
    from runner.process.client import Runner

    def copies():
        """slot_copies as info and metrics report them (the same counts)."""
        counts = r.info(timeout=30).engine["slot_copies"]
        assert r.metrics(timeout=30).slot_copies == counts
        return counts

    with Runner.spawn(default_model_path, n_ctx=512, parallel=2, n_threads=2,
                      slot_save_dir=str(tmp_path)) as r:
        assert copies() == {"touched": 0, "short": 0, "fresh": 0}
        tokens = r.tokenize("The capital of France is", add_special=True)
        _, final = r.complete(tokens, temperature=0.0, num_predict=4).text()
        reply = r.save_slot(final.slot, "fr", timeout=60)
        assert reply.n_inputs == len(tokens) + 3 and reply.n_bytes > 0
        saved = copies()  # one copy of the state; a short round first unless the size was measured
        assert (saved["touched"], saved["fresh"]) == (1, 0) and saved["short"] in (0, 1)
        with pytest.raises(Refused, match="not a plain file name"):
            r.restore_slot(0, "../fr", timeout=60)
        assert main(["slot", "restore", "--endpoint", r.endpoint, "--slot", str(1 - final.slot),
                     "--name", "fr"]) == 0
        assert f"restored from 'fr': {len(tokens) + 3} tokens" in capsys.readouterr().out
        assert copies() == saved  # the slot was empty: nothing of it to keep
        r.restore_slot(final.slot, "fr", timeout=60)  # over the slot's state, copied to put back if refused
        assert copies() == dict(saved, touched=2)
        assert r.health(timeout=30).state == "ready"
        assert [s["n_inputs"] for s in r.info(timeout=30).engine["slots"]] == [len(tokens) + 3] * 2
    with Runner.spawn(default_model_path, n_ctx=512, n_threads=2) as off:
        with pytest.raises(Refused, match="--slot-save-dir"):
            off.save_slot(0, "fr", timeout=60)
