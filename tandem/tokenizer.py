"""Tokenizer and generation defaults from a local Hugging Face directory (never the hub)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json / tokenizer_config.json")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def eos_token_ids(model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, hf_config: dict) -> set[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (any may list several)."""
    ids: set[int] = set()
    gen_path = Path(model_dir) / "generation_config.json"
    sources = [hf_config.get("eos_token_id")]
    if gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    sources.append(tokenizer.eos_token_id)
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(x) for x in src)
    return ids


def tokenizer_info(tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's configuration (special tokens as text, the chat
    template, its class), so a client can tokenize remotely (lm-eval's remote tokenizer)."""
    info: dict = {}
    for key, value in tokenizer.init_kwargs.items():
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)  # AddedToken and the like: their text
        info[key] = value
    info.update(tokenizer_class=type(tokenizer).__name__, model_max_length=max_model_len,
                chat_template=tokenizer.chat_template,
                **{name: getattr(tokenizer, name) for name in ("eos_token", "bos_token", "pad_token", "unk_token")})
    return info


# Private-use code points that stand in for message contents while the template renders.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")


class ChatInputError(ValueError):
    """A chat request the template must not render; ``param`` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the request sent them (content parts, tool calls with JSON-text arguments)
    -> the messages a chat template reads: content one string, each tool call's arguments an object
    (as Hugging Face templates expect), the tool message's call id and name kept."""
    rendered = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(part.get("text", "")) for part in content)
        message: dict[str, Any] = {"role": m.get("role"), "content": content or ""}
        for key in ("name", "tool_call_id"):
            if m.get(key) is not None:
                message[key] = m[key]
        if m.get("tool_calls"):
            message["tool_calls"] = [_template_call(c) for c in m["tool_calls"]]
        rendered.append(message)
    return rendered


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    try:
        function["arguments"] = json.loads(function.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        pass  # not JSON: the template gets the text as sent
    return {"id": call.get("id"), "type": "function", "function": function}


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]],
                   add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The chat template applied (with ``tools``, function definitions, when given) and tokenized.
    NOTE: control tokens come only from the template: a message whose content holds a special
    token's text (``<|eos|>``, a role marker) has that text tokenized as plain text, so a user
    cannot forge turns or end the prompt; tools and tool calls holding such text are refused."""
    specials = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    extras = [{k: v for k, v in m.items() if k not in ("role", "content")} for m in conversation]
    for param, value in (("tools", tools), ("messages", [e for e in extras if e])):
        if value and any(s in json.dumps(value, ensure_ascii=False) for s in specials):
            raise ChatInputError(param, f"{param}: tool definitions, tool calls and message names must not "
                                        "contain a special token's text")
    tool_list: list[Any] | None = list(tools) if tools else None
    if not any(s in m["content"] for m in conversation for s in specials):
        return list(tokenizer.apply_chat_template(conversation, tools=tool_list, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))
    stand_ins = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(conversation)]
    text = str(tokenizer.apply_chat_template(stand_ins, tools=tool_list, tokenize=False,
                                             add_generation_prompt=add_generation_prompt))
    ids: list[int] = []
    for i, piece in enumerate(_SENTINEL_RE.split(text)):
        if i % 2 == 0:  # the template's own text: its markers are special
            ids += tokenizer.encode(piece, add_special_tokens=False) if piece else []
        else:
            ids += tokenizer.encode(conversation[int(piece)]["content"], add_special_tokens=False,
                                    split_special_tokens=True)
    return ids
