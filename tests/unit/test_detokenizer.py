"""Incremental detokenizer: equality with full decode, UTF-8 safety, stop strings, spacing."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tandem.engine.detokenizer import IncrementalDetokenizer, decode_token
from tandem.sampling_params import SamplingParams

REPL = "\ufffd"
CORPUS = [
    "Hello world, this is a small corpus. Café, naïve, résumé, élève, déjà vu.",
    "你好，世界！你好吗？我很好。中文字符 你好 世界",
    "Emoji time 🙂 🙂🙂 party 🎉 and rocket 🚀 with smile 🙂.",
    "The quick brown fox jumps over the lazy dog. def fibonacci(n): return n",
    "Stop here. STOP. stop words: end, END, <end>, ###, \n\n lines\nand more lines",
] * 4


def _hf(tok: Tokenizer, **kw: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kw)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) with 256 byte tokens, so multi-byte chars can be split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return _hf(tok, bos_token="<|bos|>", eos_token="<|eos|>")


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-like BPE: '▁' marks word starts; the decoder drops the first leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS, trainer)
    return _hf(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_token_ids(hf: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte of ``text`` (splits every multi-byte char)."""
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    table = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(table.values()) == set(byte_to_char)
    return [hf.backend_tokenizer.token_to_id(table[b]) for b in text.encode("utf-8")]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable char table, indexed by byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _detok(hf: PreTrainedTokenizerFast, prompt: list[int] | None = None, **kw: object) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(hf, SamplingParams(**kw), prompt or [])


def _stream(d: IncrementalDetokenizer, ids: list[int], sizes: list[int] | None = None) -> tuple[list[str], str | None]:
    """Feed ``ids`` in chunks (of ``sizes``, default 1); return the streamed deltas and stop."""
    deltas, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        stop = d.update(ids[i:i + n])
        i, k = i + n, k + 1
        deltas.append(d.get_next_output_text(finished=stop is not None, delta=True))
        if stop is not None:
            return deltas, stop
    deltas.append(d.get_next_output_text(finished=True, delta=True))
    return deltas, None


# ----------------------------------------------------------------------------- equality with decode


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_one_at_a_time_match_full_decode(bpe: PreTrainedTokenizerFast, skip: bool) -> None:
    rng = random.Random(0)
    vocab = len(bpe)
    for _ in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        d = _detok(bpe, prompt, skip_special_tokens=skip)
        for j, tid in enumerate(ids):
            d.update([tid])
            full = bpe.decode(ids[: j + 1], skip_special_tokens=skip)
            # Emitted text is a prefix of the full decode; only a trailing incomplete char is held.
            assert full.startswith(d.output_text)
            held = full[len(d.output_text):]
            assert held == "" or held.endswith(REPL)
        deltas = d.get_next_output_text(finished=True, delta=False)
        assert deltas == d.output_text == bpe.decode(ids, skip_special_tokens=skip)
        assert d.token_ids == ids


def test_random_ids_in_chunks_match_full_decode(bpe: PreTrainedTokenizerFast) -> None:
    rng = random.Random(1)
    for _ in range(60):
        ids = [rng.randrange(len(bpe)) for _ in range(rng.randrange(1, 60))]
        sizes = [rng.randrange(1, 6) for _ in range(5)]
        deltas, stop = _stream(_detok(bpe), ids, sizes)
        assert stop is None
        assert "".join(deltas) == bpe.decode(ids, skip_special_tokens=True)


def test_real_text_split_into_bytes_matches(bpe: PreTrainedTokenizerFast) -> None:
    """Natural text, and the same text as one token per byte, both stream back verbatim."""
    rng = random.Random(2)
    for _ in range(30):
        text = "".join(rng.choice(CORPUS)[rng.randrange(20):][:30] for _ in range(2))
        for ids in (bpe.encode(text, add_special_tokens=False), _byte_token_ids(bpe, text)):
            deltas, _ = _stream(_detok(bpe), ids, [rng.randrange(1, 4)])
            assert "".join(deltas) == text
            assert all(REPL not in x for x in deltas)


def test_emoji_split_over_tokens_never_partial(bpe: PreTrainedTokenizerFast) -> None:
    ids = _byte_token_ids(bpe, "a🎉b")
    assert len(ids) == 6  # 1 + 4 bytes + 1
    d = _detok(bpe)
    deltas = []
    for tid in ids:
        d.update([tid])
        deltas.append(d.get_next_output_text(finished=False, delta=True))
    assert deltas == ["a", "", "", "", "🎉", "b"]


def test_incomplete_char_at_finish_is_flushed_like_full_decode(bpe: PreTrainedTokenizerFast) -> None:
    ids = _byte_token_ids(bpe, "ok 你")[:-1]  # last char cut after 2 of its 3 bytes
    d = _detok(bpe)
    d.update(ids)
    assert d.output_text == "ok "
    assert d.get_next_output_text(finished=False, delta=True) == "ok "
    assert d.get_next_output_text(finished=True, delta=True) == bpe.decode(ids)[3:]
    assert d.output_text == bpe.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(bpe: PreTrainedTokenizerFast, skip: bool) -> None:
    bos, eos = bpe.bos_token_id, bpe.eos_token_id
    ids = [bos] + bpe.encode("Hello 🙂", add_special_tokens=False) + [eos, eos] + bpe.encode(" world")
    deltas, _ = _stream(_detok(bpe, skip_special_tokens=skip), ids)
    expected = "Hello 🙂 world" if skip else "<|bos|>Hello 🙂<|eos|><|eos|> world"
    assert "".join(deltas) == expected == bpe.decode(ids, skip_special_tokens=skip)


def test_spaces_between_special_tokens() -> None:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[CLS]", "[SEP]"])
    hf = _hf(tok)
    ids = [1, 2, 3, 5, 4, 2]
    with_spaces, _ = _stream(_detok(hf, skip_special_tokens=False), ids)
    assert "".join(with_spaces) == "[CLS] [SEP] hellos world [SEP]"
    without, _ = _stream(_detok(hf, skip_special_tokens=False, spaces_between_special_tokens=False), ids)
    assert "".join(without) == "[CLS][SEP] hellos world [SEP]"


# ----------------------------------------------------------------------------- Metaspace


def test_metaspace_continuation_keeps_leading_space(metaspace: PreTrainedTokenizerFast) -> None:
    prompt = metaspace.encode("Hello world", add_special_tokens=False)
    out = metaspace.encode(" the lazy dog", add_special_tokens=False)
    assert metaspace.convert_ids_to_tokens(out[0]).startswith("▁")
    deltas, _ = _stream(_detok(metaspace, prompt), out)
    # Same as decoding prompt + output together; decoding `out` alone would lose the space.
    assert "".join(deltas) == " the lazy dog"
    assert metaspace.decode(out) == "the lazy dog"


def test_metaspace_random_words_match_joint_decode(metaspace: PreTrainedTokenizerFast) -> None:
    rng = random.Random(3)
    words = " ".join(CORPUS[:5]).split()
    for _ in range(40):
        prompt = metaspace.encode(" ".join(rng.sample(words, 3)), add_special_tokens=False)
        out = metaspace.encode(" " + " ".join(rng.sample(words, 5)), add_special_tokens=False)
        deltas, _ = _stream(_detok(metaspace, prompt), out, [rng.randrange(1, 4)])
        joint, head = metaspace.decode(prompt + out), metaspace.decode(prompt)
        assert "".join(deltas) == joint[len(head):]


def test_empty_prompt_metaspace_has_no_leading_space(metaspace: PreTrainedTokenizerFast) -> None:
    out = metaspace.encode("the lazy dog", add_special_tokens=False)
    for prompt in ([], [metaspace.bos_token_id]):
        deltas, _ = _stream(_detok(metaspace, prompt), out)
        assert "".join(deltas) == "the lazy dog"


# ----------------------------------------------------------------------------- stop strings


def _enc(hf: PreTrainedTokenizerFast, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def test_stop_string_spanning_tokens(bpe: PreTrainedTokenizerFast) -> None:
    ids = _byte_token_ids(bpe, "Hello world and more")
    d = _detok(bpe, stop=["lo wo"])
    deltas, stop = _stream(d, ids)
    assert stop == "lo wo"
    assert d.output_text == "".join(deltas) == "Hel"
    assert len(d.token_ids) == len("Hello wo")  # stopped at the token completing the match


def test_stop_string_inside_one_chunk_and_multibyte(bpe: PreTrainedTokenizerFast) -> None:
    ids = _enc(bpe, "say 你好 now, 你好吗?")
    d = _detok(bpe, stop=["好吗"])
    assert d.update(ids) == "好吗"
    assert d.output_text == "say 你好 now, 你"


def test_include_stop_str_in_output(bpe: PreTrainedTokenizerFast) -> None:
    ids = _enc(bpe, "The quick brown fox jumps")
    d = _detok(bpe, stop=["brown f"], include_stop_str_in_output=True)
    deltas, stop = _stream(d, ids)
    assert stop == "brown f"
    assert d.output_text == "".join(deltas) == "The quick brown f"
    assert d.stop_buffer_length == 0


def test_earliest_of_several_stop_strings_wins(bpe: PreTrainedTokenizerFast) -> None:
    d = _detok(bpe, stop=["world", "lo", "Hello w"])
    assert d.update(_enc(bpe, "Hello world")) == "Hello w"
    assert d.output_text == ""
    d = _detok(bpe, stop=["world", "lo"])
    assert d.update(_enc(bpe, "Hello world")) == "lo"
    assert d.output_text == "Hel"


def test_stop_not_checked_on_prompt(bpe: PreTrainedTokenizerFast) -> None:
    d = _detok(bpe, _enc(bpe, "Hello STOP"), stop=["STOP", "P x"])
    assert d.update(_enc(bpe, " x")) is None
    assert d.output_text == " x"


def test_streaming_holds_back_partial_stop_string(bpe: PreTrainedTokenizerFast) -> None:
    text = "aaa <en <end <e> done <end> tail"
    d = _detok(bpe, stop=["<end>", "###"])
    assert d.stop_buffer_length == 4
    sent = ""
    for tid in _byte_token_ids(bpe, text):
        stop = d.update([tid])
        sent += d.get_next_output_text(finished=stop is not None, delta=True)
        if stop is not None:
            break
        assert sent == d.output_text[: max(0, len(d.output_text) - 4)]
        assert d.get_next_output_text(finished=False, delta=False) == sent
    assert stop == "<end>"
    assert sent == d.output_text == "aaa <en <end <e> done "


def test_held_back_text_released_at_finish_without_stop(bpe: PreTrainedTokenizerFast) -> None:
    d = _detok(bpe, stop=["zzzz"])
    deltas, stop = _stream(d, _enc(bpe, "no stop here zzz"))
    assert stop is None
    assert deltas[-1] == "zzz"
    assert "".join(deltas) == "no stop here zzz"


def test_min_tokens_defers_stop_strings(bpe: PreTrainedTokenizerFast) -> None:
    ids = _byte_token_ids(bpe, "ab.cd.ef")
    d = _detok(bpe, stop=["."], min_tokens=4)
    _, stop = _stream(d, ids)
    assert stop == "." and d.output_text == "ab.cd"


def test_stop_terminated_token_text_excluded(bpe: PreTrainedTokenizerFast) -> None:
    eos = bpe.eos_token_id
    d = _detok(bpe, skip_special_tokens=False)
    d.update(_enc(bpe, "Hi"))
    assert d.update([eos], stop_terminated=True) is None
    assert d.output_text == "Hi" and d.token_ids[-1] == eos
    d = _detok(bpe, skip_special_tokens=False, include_stop_str_in_output=True)
    d.update(_enc(bpe, "Hi") + [eos], stop_terminated=True)
    assert d.output_text == "Hi<|eos|>"


# ----------------------------------------------------------------------------- misc


def test_recovers_from_invalid_prefix_error(bpe: PreTrainedTokenizerFast) -> None:
    ids = _enc(bpe, "Hello world 🙂 again")
    d = _detok(bpe)
    d.update(ids[:3])

    class Broken:
        def step(self, tokenizer: object, token_id: int) -> str | None:
            raise Exception("Invalid prefix encountered")

    d._stream = Broken()  # type: ignore[assignment]
    d.update(ids[3:])
    assert d.get_next_output_text(finished=True, delta=False) == "Hello world 🙂 again"


def test_decode_token(bpe: PreTrainedTokenizerFast) -> None:
    eos = bpe.eos_token_id
    assert decode_token(bpe, eos) == "<|eos|>"
    hello = _enc(bpe, "Hello")[0]
    assert decode_token(bpe, hello) == bpe.decode([hello])
    assert decode_token(bpe, _byte_token_ids(bpe, "🎉")[0]) == REPL
    assert decode_token(bpe, 10**9) == ""

