"""Stop-string matching and UTF-8-safe incremental detokenization."""

from __future__ import annotations

import random

import pytest

from backends.textstream import IncrementalDetokenizer, StopStringMatcher

from tiny_models import build_tokenizer


def run_matcher(stops, pieces):
    m = StopStringMatcher(stops)
    out = []
    stopped = False
    for p in pieces:
        emit, stopped = m.feed(p)
        out.append(emit)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, out


def test_stop_string_split_across_pieces():
    text, stopped, out = run_matcher(["</end>"], ["Hello ", "wor", "ld</", "en", "d> trailing"])
    assert stopped
    assert text == "Hello world"
    # "</" and "</en" were held back rather than emitted and taken back
    assert all("<" not in piece for piece in out)


def test_partial_match_that_fails_is_released():
    text, stopped, _out = run_matcher(["STOP"], ["go ST", "O", "ay here"])
    assert not stopped
    assert text == "go STOay here"


def test_held_tail_emitted_on_flush():
    m = StopStringMatcher(["###"])
    assert m.feed("abc#") == ("abc", False)
    assert m.feed("#") == ("", False)
    assert m.flush() == "##"


def test_earliest_of_several_stops_wins():
    text, stopped, _ = run_matcher(["world", "lo w"], ["Hello world"])
    assert stopped
    assert text == "Hel"


def test_no_stops_passes_everything():
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_after_stop_everything_is_dropped():
    m = StopStringMatcher(["x"])
    assert m.feed("axb") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == ""
    assert m.matched == "x"


def test_empty_stop_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


@pytest.mark.parametrize("seed", range(5))
def test_stop_matcher_random_splits_match_reference(seed):
    rng = random.Random(seed)
    text = "alpha beta <|im_end|> gamma" if seed % 2 else "no stop in this text at all <|im_"
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    got, stopped, _ = run_matcher(["<|im_end|>"], pieces)
    idx = text.find("<|im_end|>")
    assert got == (text[:idx] if idx >= 0 else text)
    assert stopped == (idx >= 0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


MULTIBYTE = "Emoji 😀👍🏽 and CJK 中文字符 ひらがな, naïve café 東京 🙂."


def test_multibyte_chars_really_split_over_tokens(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in tokenizer.decode([i])]
    assert len(partial) >= 8, "test text should contain characters spread over several byte tokens"


def test_incremental_decode_never_emits_partial_chars(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer)
    pieces = [det.add(i) for i in ids]
    pieces.append(det.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    # it streamed, not just emitted everything at the end
    assert sum(1 for p in pieces if p) > 10


def test_incremental_decode_after_prompt_and_special_tokens(tokenizer):
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi 東京"}], add_generation_prompt=True)
    reply = "答え: 🙂 yes"
    ids = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.convert_tokens_to_ids("<|im_end|>")]
    det = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids)
    text = "".join(det.add(i) for i in ids) + det.flush()
    assert text == reply
    keep = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=False)
    assert "".join(keep.add(i) for i in ids) + keep.flush() == reply + "<|im_end|>"


def test_incomplete_char_at_end_comes_out_on_flush(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)
    det = IncrementalDetokenizer(tokenizer)
    streamed = "".join(det.add(i) for i in ids[:-1])  # last byte of the emoji missing
    assert "\ufffd" not in streamed
    assert streamed.startswith("ok")
    tail = det.flush()
    assert tail.endswith("\ufffd")
