"""Tool calls in chat completions: the constraint that `tool_choice` required or a named function
puts on the output, and the extractors that turn a choice's text into OpenAI ``tool_calls``.

Every extractor is incremental (``feed`` each new piece of text, then ``finish``) and returns
(content, tool-call deltas) in the shape of a streamed chunk's ``delta``; a non-streamed response
runs the same extractor over the whole text and merges the deltas (``collect``), so streamed and
whole responses cannot disagree. A text the parser cannot read as a call stays content: nothing the
model wrote is dropped.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, Protocol

# What a model writes to call a tool, by vLLM's --tool-call-parser names.
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
LLAMA3_PYTHON_TAG = "<|python_tag|>"
MISTRAL_TOOL_CALLS = "[TOOL_CALLS]"


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def _whole_call(index: int, name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}


def _call_from_json(obj: Any, index: int, args_keys: tuple[str, ...]) -> dict | None:
    """A parsed {"name": ..., <args key>: ...} object -> a whole tool-call delta; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    for key in args_keys:
        if key in obj:
            return _whole_call(index, obj["name"], obj[key])
    return _whole_call(index, obj["name"], {})


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker`` (kept until the
    next piece says whether the marker follows)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallExtractor(Protocol):
    def feed(self, text: str) -> tuple[str, list[dict]]:
        """The next piece of the choice's text -> (content to send, tool-call deltas to send)."""
        ...

    def finish(self) -> tuple[str, list[dict]]:
        """The text is complete: whatever was held back."""
        ...


class NamedFunction:
    """tool_choice names a function: the whole output is its arguments (constrained to its schema),
    streamed as argument fragments of call 0."""

    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        if not self.started:
            self.started = True
            return "", [{"index": 0, "id": call_id(), "type": "function",
                         "function": {"name": self.name, "arguments": text}}]
        return "", [{"index": 0, "function": {"arguments": text}}] if text else []

    def finish(self) -> tuple[str, list[dict]]:
        return self.feed("") if not self.started else ("", [])


class _CallObjects:
    """The shared part of the parsers whose calls are bare JSON objects in a row: decoding complete
    call objects from ``pos`` on as they arrive."""

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self.args_keys = args_keys
        self.buffer, self.pos, self.calls = "", 0, 0
        self.decoder = json.JSONDecoder()

    def _scan(self, separators: str) -> tuple[list[dict], bool]:
        """The complete call objects from ``pos`` on, between whitespace and ``separators``, and
        whether the scan is blocked: the text there is not a call object (an incomplete object waits)."""
        deltas: list[dict] = []
        while True:
            rest = self.buffer[self.pos:].lstrip(" \t\r\n" + separators)
            self.pos = len(self.buffer) - len(rest)
            if not rest:
                return deltas, False
            if rest[0] != "{":
                return deltas, True
            try:
                obj, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                return deltas, False  # incomplete (or never valid: finish() keeps it as content)
            call = _call_from_json(obj, self.calls, self.args_keys)
            if call is None:
                return deltas, True
            self.calls, self.pos = self.calls + 1, end
            deltas.append(call)


class JsonArrayCalls(_CallObjects):
    """The output is (after ``prefix``) a JSON array of call objects: tool_choice required (vLLM's
    {"name", "parameters"} items) and Mistral's ``[TOOL_CALLS][{"name", "arguments"}, ...]``. Each
    item goes out as soon as it is complete."""

    def __init__(self, args_keys: tuple[str, ...], prefix: str = "") -> None:
        super().__init__(args_keys)
        self.prefix = prefix
        self.in_array = False  # past the prefix and the "["
        self.content_done = not prefix  # text before the prefix is content
        self.passthrough = False  # what followed the prefix is not a call array: everything is content

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        content = ""
        if not self.content_done:
            at = self.buffer.find(self.prefix)
            if at < 0:
                keep = _held_back(self.buffer, self.prefix)
                content, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return content, []
            content, self.buffer, self.content_done = self.buffer[:at], self.buffer[at + len(self.prefix):], True
        if self.passthrough:
            content, self.buffer = content + self.buffer, ""
            return content, []
        deltas, failed = self._items()
        if failed:  # not a call array after all: the unparsed rest is content, from here on
            content += self._unparsed()
            self.passthrough, self.buffer, self.pos = True, "", 0
        return content, deltas

    def _unparsed(self) -> str:
        return self.prefix + self.buffer if self.calls == 0 else self.buffer[self.pos:]

    def _items(self) -> tuple[list[dict], bool]:
        """The calls now complete, and whether the text turned out not to be a call array."""
        if not self.in_array:
            rest = self.buffer[self.pos:].lstrip()
            if not rest:
                return [], False
            if rest[0] != "[":
                return [], True
            self.in_array, self.pos = True, len(self.buffer) - len(rest) + 1
        deltas, blocked = self._scan(",")
        # "]" ends the array; what follows it is content (finish)
        return deltas, blocked and not self.buffer.startswith("]", self.pos)

    def finish(self) -> tuple[str, list[dict]]:
        if not self.content_done or self.passthrough:  # no call array began: the rest is content
            content, self.buffer = self.buffer, ""
            return content, []
        if self.calls == 0:  # nothing parsed (e.g. cut off by max_tokens): the text as written
            return self._unparsed(), []
        rest = self.buffer[self.pos:].strip()
        return rest[1:].strip() if rest.startswith("]") else rest, []


class HermesCalls:
    """Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks between
    ordinary content."""

    def __init__(self) -> None:
        self.buffer, self.in_call, self.calls = "", False, 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        content, deltas = "", []  # type: tuple[str, list[dict]]
        while True:
            if not self.in_call:
                at = self.buffer.find(HERMES_START)
                if at < 0:
                    keep = _held_back(self.buffer, HERMES_START)
                    content += self.buffer[:len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return content, deltas
                content += self.buffer[:at]
                self.buffer, self.in_call = self.buffer[at + len(HERMES_START):], True
            at = self.buffer.find(HERMES_END)
            if at < 0:
                return content, deltas
            body, self.buffer, self.in_call = self.buffer[:at], self.buffer[at + len(HERMES_END):], False
            call = self._parse(body)
            if call is None:
                content += HERMES_START + body + HERMES_END
            else:
                deltas.append(call)

    def _parse(self, body: str) -> dict | None:
        try:
            call = _call_from_json(json.loads(body), self.calls, ("arguments", "parameters"))
        except json.JSONDecodeError:
            return None
        if call is not None:
            self.calls += 1
        return call

    def finish(self) -> tuple[str, list[dict]]:
        rest, self.buffer = self.buffer, ""
        if not self.in_call:
            return rest, []
        call = self._parse(rest)  # an unclosed last call (the model stopped at its end of turn)
        return ("", [call]) if call is not None else (HERMES_START + rest, [])


class Llama3JsonCalls(_CallObjects):
    """Llama 3.x JSON tool calling: the whole output is ``{"name": ..., "parameters": {...}}``
    (optionally after ``<|python_tag|>``, several joined by ``;``); any other output is content."""

    def __init__(self) -> None:
        super().__init__(("parameters", "arguments"))
        self.mode: str | None = None  # None: undecided, "content" or "calls"

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or LLAMA3_PYTHON_TAG.startswith(head):
                return "", []
            if head.startswith(LLAMA3_PYTHON_TAG):
                self.mode, self.pos = "calls", len(self.buffer) - len(head) + len(LLAMA3_PYTHON_TAG)
            elif head.startswith("{"):
                self.mode, self.pos = "calls", len(self.buffer) - len(head)
            else:
                self.mode = "content"
        if self.mode == "content":
            content, self.buffer = self.buffer, ""
            return content, []
        return "", self._scan(";")[0]  # a blocked scan leaves the rest to finish() as content

    def finish(self) -> tuple[str, list[dict]]:
        if self.mode == "calls" and self.calls > 0:
            return self.buffer[self.pos:].strip(), []
        rest, self.buffer = self.buffer, ""
        return rest, []


def _mistral() -> ToolCallExtractor:
    return JsonArrayCalls(("arguments", "parameters"), prefix=MISTRAL_TOOL_CALLS)


TOOL_CALL_PARSERS: dict[str, Callable[[], ToolCallExtractor]] = {
    "hermes": HermesCalls,
    "llama3_json": Llama3JsonCalls,
    "mistral": _mistral,
}
# parsers whose call marker is a special token, so the text must keep special tokens
KEEPS_SPECIAL_TOKENS = {"mistral"}


def collect(extractor: ToolCallExtractor, text: str) -> tuple[str, list[dict]]:
    """The whole text through ``extractor`` -> (content, tool calls as a response message lists them)."""
    content, deltas = extractor.feed(text)
    more_content, more = extractor.finish()
    calls: dict[int, dict] = {}
    for d in deltas + more:
        call = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function",
                                             "function": {"name": d["function"].get("name"), "arguments": ""}})
        call["function"]["arguments"] += d["function"].get("arguments", "")
    return content + more_content, [calls[i] for i in sorted(calls)]


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """tool_choice required: a JSON array of one or more {"name", "parameters"} calls of the given
    tools (at most one without parallel tool calls), each valid against its tool's schema."""
    items = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["name"]]},
                             "parameters": t.get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema: dict = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema
