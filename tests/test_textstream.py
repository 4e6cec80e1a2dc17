"""TextStream: UTF-8 reassembly, stop strings across pieces, and what to trim."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine.textstream import TextStream


def run(stop, pieces):
    """Feed every piece (stopping early like the engine); return (per-feed outputs, tail, stream)."""
    stream = TextStream(stop)
    outs = []
    for piece in pieces:
        outs.append(stream.feed(piece))
        if stream.stopped:
            break
    return outs, stream.finish(), stream


def test_no_stop_strings_passes_text_through():
    outs, tail, stream = run([], [b"Hello", b", ", b"world"])
    assert outs == ["Hello", ", ", "world"] and tail == ""
    assert not stream.stopped and stream.stop is None and stream.n_feeds_to_trim == 0


def test_stop_across_several_pieces():
    outs, tail, stream = run(["</end>"], [b"Hello <", b"/e", b"nd>", b" never fed"])
    assert outs == ["Hello ", "", ""] and tail == ""
    assert stream.stopped and stream.stop == "</end>"
    assert stream.n_feeds_to_trim == 3  # "Hello <" holds the "<"


def test_partial_match_released_when_it_diverges():
    outs, tail, stream = run(["</end>"], [b"a </e", b"x", b"!"])
    assert outs == ["a ", "</ex", "!"] and tail == ""
    assert not stream.stopped


def test_partial_match_released_at_finish():
    outs, tail, stream = run(["</end>"], [b"a </e"])
    assert outs == ["a "] and tail == "</e"
    assert not stream.stopped


def test_overlapping_partial_matches():
    # "aab" with stop "ab": the first "a" is released as soon as the second arrives.
    outs, tail, stream = run(["ab"], [b"a", b"a", b"b"])
    assert outs == ["", "a", ""] and stream.stopped and stream.n_feeds_to_trim == 2


@pytest.mark.parametrize("stops,pieces,text,stop,trim", [
    (["User:", "\n\n"], [b"Hi", b"\n", b"\nUser:"], "Hi", "\n\n", 2),
    (["User:", "\n\n"], [b"Hi\nUs", b"er:"], "Hi\n", "User:", 2),
    # Generation stops at the first character completing any stop string ...
    (["abcd", "bc"], [b"abcd"], "a", "bc", 1),
    # ... and cuts before the longest stop string ending at that character.
    (["bc", "abc"], [b"xa", b"bc"], "x", "abc", 2),
], ids=["second stop first", "first stop", "earliest completion", "longest at same end"])
def test_multiple_stop_strings(stops, pieces, text, stop, trim):
    outs, tail, stream = run(stops, pieces)
    assert "".join(outs) + tail == text
    assert stream.stop == stop and stream.n_feeds_to_trim == trim


@pytest.mark.parametrize("stop", [[], ["x"]], ids=["no stops", "with stops"])
def test_emoji_split_into_single_bytes_is_never_emitted_half(stop):
    pieces = [bytes([b]) for b in "😀".encode()]
    outs, tail, _ = run(stop, pieces)
    assert outs == ["", "", "", "😀"] and tail == ""


def test_incomplete_utf8_at_the_end_is_dropped():
    outs, tail, _ = run(["x"], [b"ok", b"\xf0\x9f"])
    assert outs == ["ok", ""] and tail == ""
    outs, tail, _ = run([], [b"ok", b"\xe4"])
    assert outs == ["ok", ""] and tail == ""


def test_invalid_bytes_in_the_middle_are_replaced():
    outs, _, _ = run([], [b"a\xffb"])
    assert outs == ["a\ufffdb"]
    outs, _, _ = run([], [b"\xe2\x82", b"A"])  # a sequence broken by the next piece
    assert outs == ["", "\ufffdA"]


def test_cjk_stop_split_inside_characters():
    data = "你好世界".encode()
    pieces = [data[:4], data[4:8], data[8:]]  # "世" starts in the middle of piece 1
    outs, tail, stream = run(["世界"], pieces)
    assert outs == ["你", "好", ""] and tail == ""
    assert stream.stop == "世界" and stream.n_feeds_to_trim == 2


def test_stop_at_the_very_start():
    outs, tail, stream = run(["<|end|>"], [b"<|end|>", b"more"])
    assert outs == [""] and tail == "" and stream.n_feeds_to_trim == 1


@pytest.mark.parametrize("stops,pieces,text,trim", [
    (["STOP"], [b"abc", b"ST", b"OP"], "abc", 2),
    (["STOP"], [b"abcST", b"OPxyz"], "abc", 2),
    (["STOP"], [b"abc", b"STOP"], "abc", 1),
    (["STOP"], [b"S", b"", b"T", b"O", b"P"], "", 5),  # an empty piece in between counts
    (["😀"], [bytes([b]) for b in "😀".encode()], "", 4),
    (["!😀"], [b"hi!\xf0", b"\x9f\x98", b"\x80"], "hi", 3),
], ids=["two pieces", "mid piece", "one piece", "empty piece", "emoji bytes", "mixed"])
def test_n_feeds_to_trim(stops, pieces, text, trim):
    outs, tail, stream = run(stops, pieces)
    assert "".join(outs) + tail == text
    assert stream.stopped and stream.n_feeds_to_trim == trim


def test_feed_after_stop_or_finish_raises():
    stream = TextStream(["x"])
    stream.feed(b"x")
    with pytest.raises(RuntimeError):
        stream.feed(b"y")
    assert stream.finish() == ""
    stream = TextStream([])
    stream.finish()
    with pytest.raises(RuntimeError):
        stream.feed(b"y")


def test_empty_stop_strings_are_ignored():
    outs, tail, stream = run(["", "z"], [b"abc"])
    assert outs == ["abc"] and not stream.stopped


def test_held_back_text_is_bounded_by_the_stop_length():
    stream = TextStream(["abc"])
    assert stream.feed(b"ab") == ""
    for _ in range(1000):
        assert stream.feed(b"ab") == "ab"  # only the possible "ab" prefix is ever held
    assert stream.finish() == "ab"


# -- properties -------------------------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from("ab \n€é你😀"), max_size=40)


@st.composite
def split_bytes(draw, data: bytes):
    """Cut data into pieces at random byte offsets, empty pieces included."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), text=TEXT)
def test_property_no_stop_output_is_text(data, text):
    pieces = data.draw(split_bytes(text.encode()))
    outs, tail, _ = run([], pieces)
    assert "".join(outs) + tail == text
    stop = data.draw(TEXT.filter(lambda s: s and s not in text))
    outs, tail, stream = run([stop], pieces)
    assert "".join(outs) + tail == text and not stream.stopped


@settings(max_examples=200, deadline=None)
@given(data=st.data(), before=TEXT, after=TEXT,
       stop=st.text(alphabet=st.sampled_from("ab \n€é你😀"), min_size=1, max_size=4))
def test_property_output_ends_before_stop(data, before, after, stop):
    text = before + stop + after
    pieces = data.draw(split_bytes(text.encode()))
    outs, tail, stream = run([stop], pieces)
    at = text.find(stop)
    assert "".join(outs) + tail == text[:at]
    assert stream.stopped and stream.stop == stop
    # Pieces holding the first and the last byte of the stop string bound what to trim.
    first = len(text[:at].encode())
    last = first + len(stop.encode()) - 1
    ends, total = [], 0
    for p in pieces:
        total += len(p)
        ends.append(total)
    piece_of = lambda byte: next(i for i, e in enumerate(ends) if e > byte)  # noqa: E731
    assert stream.n_feeds_to_trim == piece_of(last) - piece_of(first) + 1


def reference_cut(text: str, stops: list[str]) -> tuple[str, str] | None:
    """Brute force: the first end position completing a stop, longest stop there."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end - len(stop)], stop
    return None


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=st.text(alphabet="abc€", max_size=30),
       stops=st.lists(st.text(alphabet="abc€", max_size=4), max_size=4))
def test_property_several_stops_match_reference(data, text, stops):
    pieces = data.draw(split_bytes(text.encode()))
    outs, tail, stream = run(stops, pieces)
    want = reference_cut(text, stops)
    if want is None:
        assert "".join(outs) + tail == text and not stream.stopped
    else:
        assert ("".join(outs) + tail, stream.stop) == want
