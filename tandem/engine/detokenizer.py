"""Incremental detokenization and stop-string matching, with vLLM's semantics.

Text is produced by ``tokenizers.decoders.DecodeStream``: per token it decodes only the few ids
since its last emitted chunk (O(1) per token, independent of output length) and holds back text
while the decode ends in U+FFFD, i.e. while a multi-byte UTF-8 character is still incomplete.
The stream is primed with a short suffix of the prompt so that decoders whose output depends on
the previous token (SentencePiece/Metaspace leading spaces, WordPiece ``##``) give the same
text as decoding prompt and output together.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from tandem.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens used to prime the stream: the shortest suffix of at least _MIN_PROMPT_CONTEXT
# tokens (at most _MAX_PROMPT_CONTEXT) that decodes to whole characters (no U+FFFD at either end).
_MIN_PROMPT_CONTEXT = 4
_MAX_PROMPT_CONTEXT = 24
# Emitted output tokens kept as decode context when flushing a held-back tail at finish.
_FLUSH_CONTEXT = 6


def _backend(tokenizer: Any) -> Tokenizer:
    """The Rust ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _safe_decode(backend: Tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    try:
        return backend.decode(ids, skip_special_tokens=skip_special_tokens)
    except (OverflowError, TypeError):  # negative / non-int id
        return ""


def _prompt_context(backend: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> list[int]:
    """Shortest usable prompt suffix; [] when none decodes cleanly (e.g. prompt ends mid-character).

    A suffix whose text ended in U+FFFD would make DecodeStream re-emit the prompt text, so such
    suffixes are never returned.
    """
    n_max = min(len(prompt_ids), _MAX_PROMPT_CONTEXT)
    for n in range(min(_MIN_PROMPT_CONTEXT, n_max), n_max + 1):
        if n == 0:
            return []
        suffix = prompt_ids[-n:]
        text = _safe_decode(backend, suffix, skip_special_tokens)
        if not text.startswith(_REPLACEMENT_CHAR) and not text.endswith(_REPLACEMENT_CHAR):
            return suffix
    return []


def _added_tokens(backend: Tokenizer) -> dict[int, str]:
    return {tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()}


class IncrementalDetokenizer:
    """Output text of one sequence, built token by token.

    Invariants:
    - ``"".join(self._parts)`` is the output text; ``self._num_chars`` is its length.
    - ``self._unsent`` joins to the suffix of the text not yet returned by a delta call
      (``self._num_unsent`` chars).
    - ``self._tail`` is the last ``max(len(stop)) - 1`` chars of the text (stop strings only).
    - The stream has been fed exactly ``self._token_ids[:self._num_fed]``; ``self._num_emitted``
      is the number of those after which the stream last returned text (the rest is held back).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self._backend = _backend(tokenizer)
        self._skip_special = params.skip_special_tokens
        self._stop: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # Chars held back while streaming so a partial stop string is never sent (vLLM's name).
        self.stop_buffer_length = 0 if self._include_stop or not self._stop else self._max_stop_len - 1

        self._prompt_ctx = _prompt_context(self._backend, list(prompt_token_ids), self._skip_special)
        self._stream = self._primed_stream(self._prompt_ctx)

        # Without spaces_between_special_tokens, consecutive added tokens are emitted as their raw
        # content (the decoder may otherwise put a space before each).
        self._added: dict[int, str] = {}
        if not (self._skip_special or params.spaces_between_special_tokens):
            self._added = _added_tokens(self._backend)
        self._last_added = False

        self._token_ids: list[int] = []
        self._num_fed = 0
        self._num_emitted = 0
        self._parts: list[str] = []
        self._num_chars = 0
        self._unsent: list[str] = []
        self._num_unsent = 0
        self._tail = ""
        self._stop_reason: str | None = None
        self._flushed = False

    # ------------------------------------------------------------------ public API

    @property
    def token_ids(self) -> list[int]:
        return self._token_ids

    @property
    def output_text(self) -> str:
        if len(self._parts) != 1:
            self._parts = ["".join(self._parts)]  # O(n), only when asked; later reads are O(1)
        return self._parts[0]

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._stop_reason

    @property
    def has_stop_strings(self) -> bool:
        return bool(self._stop)

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append sampled tokens; return the stop string that matched, if any.

        ``stop_terminated``: the last id is an EOS / stop token id that ends the request; like
        vLLM its text is left out unless ``include_stop_str_in_output``.
        """
        if not new_token_ids:
            return None
        skipped: int | None = None
        if stop_terminated and not self._include_stop:
            *new_token_ids, skipped = new_token_ids
        stop = None
        if self._stop_reason is None:
            stop = self._decode_and_check(new_token_ids)
        else:  # already finished by a stop string: the text is final
            self._token_ids.extend(new_token_ids)
        if skipped is not None:
            self._token_ids.append(skipped)
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Full text (``delta=False``) or text not returned by earlier delta calls.

        While not finished, the last ``stop_buffer_length`` chars are held back.
        """
        if finished:
            self._flush()
        hold = 0 if finished else self.stop_buffer_length
        if not delta:
            text = self.output_text
            return text[: max(0, len(text) - hold)] if hold else text
        n_send = self._num_unsent - hold
        if n_send <= 0:
            return ""
        unsent = "".join(self._unsent)
        out, rest = unsent[:n_send], unsent[n_send:]
        self._unsent = [rest] if rest else []
        self._num_unsent = len(rest)
        return out

    # ------------------------------------------------------------------ decoding

    def _decode_and_check(self, new_token_ids: list[int]) -> str | None:
        """Decode ``new_token_ids``, append their text and search it for stop strings."""
        chunks: list[str] = []  # text of tokens whose stop check is enabled (past min_tokens)
        for token_id in new_token_ids:
            self._token_ids.append(token_id)
            self._num_fed += 1
            text = self._decode_next(token_id)
            if len(self._token_ids) <= self._min_tokens:
                self._append_text(text)  # not searched: stop strings start after min_tokens
            elif text:
                chunks.append(text)
        if not chunks:
            return None
        new_text = "".join(chunks)
        num_old = len(self._tail)  # read before _append_text replaces the tail
        window_start = self._num_chars - num_old  # absolute index of window[0]
        window = self._tail + new_text
        self._append_text(new_text)
        return self._check_stop(window, window_start, num_old)

    def _decode_next(self, token_id: int) -> str:
        text = self._step(token_id)
        if text is not None:
            self._num_emitted = self._num_fed
        if self._added:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                text = content
            self._last_added = content is not None
        return text or ""

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._backend, token_id)
        except (OverflowError, TypeError):  # invalid id (e.g. negative): contributes no text
            logger.warning("detokenizer: invalid token id %r", token_id)
            return None
        except Exception as exc:  # DecodeStream's "Invalid prefix" (non-monotonic decode)
            if "prefix" not in str(exc).lower():
                raise
            return self._restart_stream(token_id)

    def _primed_stream(self, context: list[int]) -> DecodeStream:
        """A stream whose next emitted text continues ``context`` (text ending on a char boundary)."""
        try:
            return DecodeStream(ids=list(context), skip_special_tokens=self._skip_special)
        except TypeError:  # tokenizers without ``ids=``: prime by stepping, discarding the text
            stream = DecodeStream(skip_special_tokens=self._skip_special)
            for token_id in context:
                stream.step(self._backend, token_id)
            return stream

    def _restart_stream(self, token_id: int) -> str | None:
        """Recover from a decode whose text does not extend the previous one (vLLM #17448).

        A fresh stream is primed with the prompt context plus the emitted output tokens, then the
        held-back tokens since the last emission and the new token are replayed through it.
        """
        logger.warning("detokenizer: non-monotonic decode at token %d; restarting stream", token_id)
        fed_before = self._token_ids[: self._num_fed - 1]
        emitted = self._prompt_ctx + fed_before[: self._num_emitted]
        self._stream = self._primed_stream(_prompt_context(self._backend, emitted, self._skip_special))
        texts: list[str] = []
        for tid in fed_before[self._num_emitted:] + [token_id]:
            try:
                text = self._stream.step(self._backend, tid)
            except Exception:  # noqa: BLE001 (any tokenizer failure mid-stream): decode the rest on its own
                self._stream = DecodeStream(skip_special_tokens=self._skip_special)
                text = self._stream.step(self._backend, tid)
            if text is not None:
                texts.append(text)
        return "".join(texts) if texts else None

    def _flush(self) -> None:
        """At finish, append text the stream still holds (a trailing incomplete character).

        That text ends in U+FFFD, exactly as a full decode of the output would. Not done after a
        stop string matched: the text is then already cut at the stop string.
        """
        if self._flushed or self._stop_reason is not None or self._num_emitted == self._num_fed:
            self._flushed = True
            return
        self._flushed = True
        fed = self._prompt_ctx + self._token_ids[: self._num_fed]
        end = len(self._prompt_ctx) + self._num_emitted
        start = max(0, end - _FLUSH_CONTEXT)
        head = _safe_decode(self._backend, fed[start:end], self._skip_special)
        full = _safe_decode(self._backend, fed[start:], self._skip_special)
        tail = full[len(head):] if full.startswith(head) else _safe_decode(
            self._backend, fed[end:], self._skip_special)
        self._append_text(tail)

    # ------------------------------------------------------------------ text bookkeeping

    def _append_text(self, text: str) -> None:
        if not text:
            return
        self._parts.append(text)
        self._num_chars += len(text)
        self._unsent.append(text)
        self._num_unsent += len(text)
        if self._max_stop_len > 1:
            self._tail = (self._tail + text)[-(self._max_stop_len - 1):]

    def _truncate(self, length: int) -> None:
        """Cut the text to ``length`` chars (only ever past everything sent by delta calls)."""
        text = self.output_text[:length]
        num_sent = self._num_chars - self._num_unsent
        self._parts = [text]
        self._num_chars = len(text)
        rest = text[num_sent:]
        self._unsent = [rest] if rest else []
        self._num_unsent = len(rest)
        self._tail = ""

    # ------------------------------------------------------------------ stop strings

    def _check_stop(self, window: str, window_start: int, num_old: int) -> str | None:
        """Search ``window`` (old tail of ``num_old`` chars + new text) for the earliest stop string.

        A match must end inside the new text (anything earlier was already searched). Ties on
        position go to the stop string listed first.
        """
        best: tuple[int, str] | None = None
        for stop in self._stop:
            idx = window.find(stop, max(0, num_old - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        cut = window_start + idx + (len(stop) if self._include_stop else 0)
        if cut < self._num_chars:
            self._truncate(cut)
        self._stop_reason = stop
        return stop


# Per-tokenizer cache of single-token texts (logprobs decode up to ~20 ids per step).
_TOKEN_TEXT_CACHE: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def decode_token(tokenizer: Any, token_id: int) -> str:
    """Text of one token decoded alone (for ``Logprob.decoded_token``), like vLLM.

    Byte-level fragments of a multi-byte character decode to U+FFFD; special tokens are kept.
    """
    try:
        cache = _TOKEN_TEXT_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    text = cache.get(token_id)
    if text is None:
        text = _safe_decode(_backend(tokenizer), [token_id], False)
        cache[token_id] = text
    return text
