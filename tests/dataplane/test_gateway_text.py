"""Streamed text: whole characters only, equal to the full decode; stop strings found across deltas
and never released."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from dataplane.gateway.text import IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def byte_tokenizer(tiny_model):
    """The tiny model's byte-level tokenizer: one token per byte, so any cut can split a character."""
    return AutoTokenizer.from_pretrained(str(tiny_model))


def stream(tokenizer, prompt: list[int], tokens: list[int], cuts: list[int]) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas, start = [], 0
    for cut in sorted(set(cuts)) + [len(tokens)]:
        deltas.append(detokenizer.add(tokens[start:cut]))
        start = max(start, cut)
    return deltas + [detokenizer.flush()]


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, prompt=TEXT, cuts=st.lists(st.integers(0, 160), max_size=12))
def test_deltas_are_whole_characters_that_add_up_to_the_text(byte_tokenizer, text, prompt, cuts):
    tokens = byte_tokenizer.encode(text, add_special_tokens=False)
    deltas = stream(byte_tokenizer, byte_tokenizer.encode(prompt), tokens, [c % (len(tokens) + 1) for c in cuts])
    assert "".join(deltas) == text == byte_tokenizer.decode(tokens)
    assert not any("\ufffd" in delta for delta in deltas), "no delta ends inside a multi-byte character"


def test_a_character_is_held_until_its_last_byte_arrives(byte_tokenizer):
    detokenizer = IncrementalDetokenizer(byte_tokenizer, [104])
    euro = byte_tokenizer.encode("€", add_special_tokens=False)
    assert len(euro) == 3
    assert [detokenizer.add([t]) for t in euro] == ["", "", "€"]


def test_an_unfinished_character_at_the_end_shows_as_the_full_decode_does(byte_tokenizer):
    detokenizer = IncrementalDetokenizer(byte_tokenizer, [])
    partial = byte_tokenizer.encode("a€", add_special_tokens=False)[:-1]
    assert detokenizer.add(partial[:1]) == "a"
    assert detokenizer.add(partial[1:]) == ""
    assert detokenizer.flush() == byte_tokenizer.decode(partial)[1:] != ""


def released(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher, out = StopStrings(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet="abc\u00e9 ", max_size=30),
    stops=st.lists(st.text(alphabet="abc\u00e9 ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_the_text_ends_right_before_the_first_stop_string_to_complete(text, stops, cuts):
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    expected = (text, False)
    for bound in bounds:  # the first delta that completes a stop string ends the text at its earliest start
        found = [i for stop in stops if (i := text[:bound].find(stop)) >= 0]
        if found:
            expected = (text[: min(found)], True)
            break
    assert released(stops, pieces) == expected


def test_a_stop_string_split_over_three_deltas_is_found_and_withheld():
    matcher = StopStrings(["</answer>"])
    assert matcher.feed("42 </an") == ("42 ", False)
    assert matcher.feed("swe") == ("", False)
    assert matcher.feed("r> and more") == ("", True)


def test_text_that_only_looks_like_a_stop_start_is_released_once_it_cannot_be_one():
    matcher = StopStrings(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART") == ("START", False)
