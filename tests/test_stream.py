"""The shared streaming state machine: stop strings, UTF-8-safe detokenization, EOS, limits, token counts."""

from __future__ import annotations

import random

import pytest

from backends.detok import IncrementalDetokenizer
from backends.stream import StopStringMatcher, TokenStream

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


class ListDecoder:
    """Token i decodes to pieces[i]; flush returns what was set as `held` (text a real decoder held back)."""

    def __init__(self, pieces: list[str], held: str = "") -> None:
        self.pieces, self.held = pieces, held

    def add(self, token_id: int) -> str:
        return self.pieces[token_id]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def run(stream: TokenStream, tokens: list[int]) -> list:
    chunks = []
    for t in tokens:
        chunks.append(stream.push(t))
        if chunks[-1].finish_reason:
            break
    return chunks


def test_token_stream_eos_counts_as_generated_and_emits_no_text():
    from backends.base import SamplingParams

    stream = TokenStream("r", 7, SamplingParams(max_new_tokens=10), eos_ids={99}, decoder=ListDecoder(["a", "b"]))
    chunks = run(stream, [0, 1, 99])
    assert [c.text for c in chunks] == ["a", "b", ""]
    assert [c.finish_reason for c in chunks] == [None, None, "stop"]
    assert chunks[-1].token_ids == [99] and stream.generated == [0, 1, 99]
    assert all(c.prompt_tokens == 7 for c in chunks)
    with pytest.raises(RuntimeError, match="after the stream finished"):
        stream.push(0)


def test_token_stream_length_releases_held_text_and_stop_across_chunks():
    from backends.base import SamplingParams

    pieces = ["Hel", "lo ", "EN", "D!", "x"]
    held = TokenStream("r", 1, SamplingParams(max_new_tokens=2), set(), ListDecoder(pieces, held="~"))
    chunks = run(held, [0, 1])
    assert "".join(c.text for c in chunks) == "Hello ~" and chunks[-1].finish_reason == "length"

    stop = TokenStream("r", 1, SamplingParams(max_new_tokens=10, stop=("END",)), set(), ListDecoder(pieces))
    chunks = run(stop, [0, 1, 2, 3, 4])
    assert "".join(c.text for c in chunks) == "Hello " and chunks[-1].finish_reason == "stop"
    assert stop.generated == [0, 1, 2, 3]  # the token that completed the stop string counts; nothing after it


def test_token_stream_cancel_and_error_drop_held_text():
    from backends.base import SamplingParams

    stream = TokenStream("r", 1, SamplingParams(max_new_tokens=10, stop=("xyz",)), set(), ListDecoder(["ab x"]))
    assert stream.push(0).text == "ab "  # " x" could start the stop string: held back
    last = stream.end("cancelled")
    assert last.text == "" and last.finish_reason == "cancelled"
    failed = TokenStream("r", 1, SamplingParams(), set(), ListDecoder([]))
    chunk = failed.end("error", "device lost")
    assert chunk.finish_reason == "error" and chunk.error == "device lost"


def chunks_on_both_backends(model, request_for) -> dict[str, list]:
    """Run `request_for()` (a fresh GenerationRequest) on torch and on onnxruntime-genai over the same fp32 model."""
    import tempfile
    from pathlib import Path

    from backends.ort_genai.backend import OrtGenaiBackend
    from backends.torch.backend import TorchBackend
    from plugin.convert import export

    with tempfile.TemporaryDirectory() as home:
        exported = export(model, target="cpu", precision="fp32", home=Path(home), progress=False, parity=False)
        out = {}
        for name, backend in (
            ("torch", TorchBackend(model, device="cpu", dtype="fp32")),
            ("onnxruntime-genai", OrtGenaiBackend(exported.path, device="cpu")),
        ):
            backend.load()
            try:
                out[name] = list(backend.generate(request_for()))
            finally:
                backend.unload()
    return out


@pytest.mark.parametrize("max_new_tokens", [3, 40])
def test_both_backends_count_and_finish_the_same_generation_alike(tiny_llama, max_new_tokens):
    """Same model, greedy: torch and onnxruntime-genai give the same text, token ids, count and finish reason."""
    from backends.base import GenerationRequest, SamplingParams

    def request():
        messages = [{"role": "user", "content": "The capital of France"}]
        return GenerationRequest(messages=messages, sampling=SamplingParams(max_new_tokens=max_new_tokens))

    results = {
        name: (
            "".join(c.text for c in chunks),
            [t for c in chunks for t in c.token_ids],
            chunks[-1].finish_reason,
            chunks[-1].prompt_tokens,
        )
        for name, chunks in chunks_on_both_backends(tiny_llama, request).items()
    }
    assert results["torch"] == results["onnxruntime-genai"]
    _, ids, finish, _ = results["torch"]
    assert len(ids) <= max_new_tokens and finish in ("stop", "length")


def test_token_stream_vllm_extensions_ignore_eos_min_tokens_stop_token_ids():
    from backends.base import SamplingParams

    pieces = ["a", "b", "STOP", "c", "d", "e"]
    ignore = TokenStream("r", 1, SamplingParams(max_new_tokens=4, ignore_eos=True), {5}, ListDecoder(pieces))
    assert [c.finish_reason for c in run(ignore, [0, 5, 1, 5])] == [None, None, None, "length"]

    early = SamplingParams(max_new_tokens=10, min_tokens=3, stop=("STOP",), stop_token_ids=(4,))
    stream = TokenStream("r", 1, early, {5}, ListDecoder(pieces))
    chunks = run(stream, [5, 2, 4, 1, 4])  # EOS, a stop string and a stop id inside the first 3: no stop
    assert [c.finish_reason for c in chunks] == [None, None, None, None, "stop"]
    assert "".join(c.text for c in chunks) == "eSTOPdbd"  # all text kept, the stop token's own included
    assert stream.generated == [5, 2, 4, 1, 4]

    with pytest.raises(ValueError, match=r"min_tokens \(5\) must not exceed max_new_tokens \(4\)"):
        SamplingParams(max_new_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="stop_token_ids must be non-negative integers"):
        SamplingParams(stop_token_ids=(-1,))


@pytest.fixture(scope="module")
def early_eos_model(tiny_llama, tmp_path_factory):
    """A copy of the tiny model whose EOS is its 3rd greedy token, and its CPU export: EOS really happens."""
    import json
    import shutil

    from backends.base import GenerationRequest, SamplingParams
    from backends.torch.backend import TorchBackend
    from plugin.convert import export

    probe = TorchBackend(tiny_llama, device="cpu", dtype="fp32")
    probe.load()
    request = GenerationRequest(prompt="The capital of France", sampling=SamplingParams(max_new_tokens=8))
    ids = [t for c in probe.generate(request) for t in c.token_ids]
    probe.unload()
    eos_at = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    folder = shutil.copytree(tiny_llama, tmp_path_factory.mktemp("early-eos") / "model")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = ids[eos_at]
        (folder / name).write_text(json.dumps(config))
    home = tmp_path_factory.mktemp("early-eos-home")
    exported = export(folder, target="cpu", precision="fp32", home=home, progress=False, parity=False)
    return folder, exported.path, eos_at


@pytest.mark.parametrize(
    ("options", "check"),
    [
        ({}, lambda n, finish, eos_at: n == eos_at + 1 and finish == "stop"),
        ({"ignore_eos": True}, lambda n, finish, eos_at: n == 10 and finish == "length"),
        ({"min_tokens": 6}, lambda n, finish, eos_at: n >= 6),
    ],
    ids=["eos-stops", "ignore_eos", "min_tokens"],
)
def test_vllm_extensions_mean_the_same_on_both_backends(early_eos_model, options, check):
    from backends.base import GenerationRequest, SamplingParams
    from backends.ort_genai.backend import OrtGenaiBackend
    from backends.torch.backend import TorchBackend

    model, export_dir, eos_at = early_eos_model
    results = {}
    for name, backend in (
        ("torch", TorchBackend(model, device="cpu", dtype="fp32")),
        ("onnxruntime-genai", OrtGenaiBackend(export_dir, device="cpu")),
    ):
        backend.load()
        try:
            request = GenerationRequest(
                prompt="The capital of France", sampling=SamplingParams(max_new_tokens=10, **options)
            )
            chunks = list(backend.generate(request))
        finally:
            backend.unload()
        results[name] = ([t for c in chunks for t in c.token_ids], chunks[-1].finish_reason)
    assert results["torch"] == results["onnxruntime-genai"]
    tokens, finish = results["torch"]
    assert check(len(tokens), finish, eos_at), (tokens, finish, eos_at)


def test_token_logprob_is_log_softmax_and_ranks_the_top():
    import numpy as np

    from backends.stream import token_logprob

    logits = np.array([1.0, 3.0, 2.0, -1.0])
    lp = token_logprob(logits, 2, 3)
    expected = logits - np.log(np.exp(logits).sum())
    assert lp.logprob == pytest.approx(expected[2])
    assert [i for i, _ in lp.top] == [1, 2, 0] and lp.top[0][1] == pytest.approx(expected[1])
    assert token_logprob(logits, 1, 0).top == ()


def test_logprobs_agree_between_backends_and_greedy_tokens_are_the_most_likely(tiny_llama):
    from backends.base import GenerationRequest, SamplingParams

    def request():
        return GenerationRequest(prompt="The capital of France", sampling=SamplingParams(max_new_tokens=6, logprobs=3))

    results = {}
    for name, chunks in chunks_on_both_backends(tiny_llama, request).items():
        entries = [lp for c in chunks for lp in (c.logprobs or [])]
        tokens = [t for c in chunks for t in c.token_ids]
        assert [e.token_id for e in entries] == tokens  # one entry per generated token, EOS included
        for e in entries:  # greedy: the chosen token is the most likely one
            assert len(e.top) == 3 and e.top[0][0] == e.token_id and e.logprob == pytest.approx(e.top[0][1])
            assert e.logprob <= 0
        results[name] = entries
    for a, b in zip(results["torch"], results["onnxruntime-genai"], strict=True):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-3)
