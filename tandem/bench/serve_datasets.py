"""Workloads for `tandem bench serve`: each becomes a list of ServeRequest (text prompt, its token
count under the model's tokenizer, requested output length, group, optional fixed send time).

- random: vLLM's RandomDataset (same seed -> the same prompts as `vllm bench serve`), optionally
  behind a shared random prefix of --random-prefix-len tokens.
- prefix-repetition: vLLM's shape: --prefix-repetition-num-prefixes random prefixes, each request
  one of them plus its own random suffix; shuffled.
- shared-prefix: groups of requests sharing a long system prompt (SGLang's generated-shared-prefix
  shape): --shared-prefix-num-groups groups x --shared-prefix-prompts-per-group questions.
- sharegpt: a local ShareGPT JSON file; first human turn is the prompt, the reply's token count is
  the output length (vLLM's filter: prompt and reply >= 4 tokens, prompt <= 1024, sum <= 2048).
- interference: `chat` requests arriving at --request-rate plus `long` document requests sent on a
  fixed schedule (every --interference-long-interval seconds); latencies are reported per group.
- multi-turn: --multi-turn-conversations conversations of --multi-turn-turns turns; turn k's prompt
  is a shared-nothing context, then k earlier user messages each followed by a fixed assistant
  reply, then the new user message (so each turn extends the previous turn's prompt). Requests
  are sent round-robin over the conversations at --request-rate, so between two turns of one
  conversation every other conversation sends one: with a small KV cache the prefix has been
  evicted by the time it returns. Reported per turn (group ``turn-K``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.bench.throughput import sample_random_requests

DATASETS = ("random", "prefix-repetition", "shared-prefix", "sharegpt", "interference", "multi-turn")


@dataclass
class ServeRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int
    group: str = "default"
    send_at: float | None = None  # seconds after the start; None = the arrival process decides
    system: str | None = None  # chat endpoints send it as a system message


def add_dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT JSON file for --dataset-name sharegpt")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    p.add_argument("--prefix-repetition-output-len", type=int, default=128)
    p.add_argument("--shared-prefix-num-groups", type=int, default=4)
    p.add_argument("--shared-prefix-system-len", type=int, default=1024)
    p.add_argument("--shared-prefix-question-len", type=int, default=64)
    p.add_argument("--shared-prefix-output-len", type=int, default=128)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override every reply's length")
    p.add_argument("--interference-chat-input-len", type=int, default=128)
    p.add_argument("--interference-chat-output-len", type=int, default=128)
    p.add_argument("--interference-long-input-len", type=int, default=4096)
    p.add_argument("--interference-long-output-len", type=int, default=16)
    p.add_argument("--interference-long-interval", type=float, default=10.0,
                   help="seconds between long-document requests (the first at interval/2)")
    p.add_argument("--interference-num-long", type=int, default=None,
                   help="long requests (default: as many as fit while the chat requests arrive)")
    p.add_argument("--multi-turn-conversations", type=int, default=8)
    p.add_argument("--multi-turn-turns", type=int, default=4, help="turns per conversation (--num-prompts is "
                                                                   "ignored: conversations x turns requests)")
    p.add_argument("--multi-turn-context-len", type=int, default=512, help="tokens before the first user message")
    p.add_argument("--multi-turn-user-len", type=int, default=64)
    p.add_argument("--multi-turn-reply-len", type=int, default=64, help="tokens of each earlier assistant reply")
    p.add_argument("--multi-turn-output-len", type=int, default=32)


def _random_text(tokenizer, rng: np.random.Generator, length: int) -> tuple[str, int]:
    """Random allowed ids decoded to text; returns (text, its token count when re-encoded)."""
    if length <= 0:
        return "", 0
    special = set(tokenizer.all_special_ids)
    ids = [int(t) for t in rng.integers(0, tokenizer.vocab_size, size=length * 2) if int(t) not in special][:length]
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def random_requests(tokenizer, args) -> list[ServeRequest]:
    reqs, _ = sample_random_requests(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                                     args.random_range_ratio, args.seed)
    prefix = ""
    if args.random_prefix_len > 0:
        prefix, _ = _random_text(tokenizer, np.random.default_rng(args.seed + 7), args.random_prefix_len)
    out = []
    for r in reqs:
        text = prefix + tokenizer.decode(r.prompt_token_ids)
        out.append(ServeRequest(text, _count(tokenizer, text) if prefix else r.prompt_len, r.expected_output_len))
    return out


def prefix_repetition_requests(tokenizer, args) -> list[ServeRequest]:
    rng = np.random.default_rng(args.seed)
    prefixes = [_random_text(tokenizer, rng, args.prefix_repetition_prefix_len)[0]
                for _ in range(args.prefix_repetition_num_prefixes)]
    out = []
    for i in range(args.num_prompts):
        suffix, _ = _random_text(tokenizer, rng, args.prefix_repetition_suffix_len)
        text = prefixes[i % len(prefixes)] + suffix
        out.append(ServeRequest(text, _count(tokenizer, text), args.prefix_repetition_output_len,
                                group=f"prefix-{i % len(prefixes)}"))
    rng.shuffle(out)
    return out


def shared_prefix_requests(tokenizer, args) -> list[ServeRequest]:
    """Round-robin over groups so each group's later requests can hit its cached system prompt."""
    rng = np.random.default_rng(args.seed)
    systems = [_random_text(tokenizer, rng, args.shared_prefix_system_len)[0]
               for _ in range(args.shared_prefix_num_groups)]
    out = []
    for i in range(args.num_prompts):
        g = i % len(systems)
        question, _ = _random_text(tokenizer, rng, args.shared_prefix_question_len)
        out.append(ServeRequest(question, _count(tokenizer, systems[g] + question), args.shared_prefix_output_len,
                                group=f"group-{g}", system=systems[g]))
    return out


def load_sharegpt(path: str | Path, tokenizer, num_prompts: int, seed: int,
                  output_len: int | None = None) -> list[ServeRequest]:
    data = json.loads(Path(path).read_text())
    order = np.random.default_rng(seed).permutation(len(data))
    out = []
    for idx in order:
        conv = data[int(idx)].get("conversations") or []
        if len(conv) < 2:
            continue
        prompt, reply = conv[0]["value"], conv[1]["value"]
        prompt_len = _count(tokenizer, prompt)
        reply_len = output_len if output_len is not None else _count(tokenizer, reply)
        if prompt_len < 4 or reply_len < 4 or prompt_len > 1024 or prompt_len + reply_len > 2048:
            continue
        out.append(ServeRequest(prompt, prompt_len, reply_len))
        if len(out) == num_prompts:
            break
    if not out:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return out


def synthetic_sharegpt(path: str | Path, num_conversations: int, seed: int = 0) -> Path:
    """A small ShareGPT-format file whose prompt/reply word counts follow log-normal laws close to
    ShareGPT's (median prompt ~ 50 words, reply ~ 200 words), for tests and offline runs."""
    rng = np.random.default_rng(seed)
    words = ["the", "model", "cache", "token", "serve", "prefix", "batch", "python", "data", "request",
             "latency", "memory", "block", "stream", "router", "decode", "prefill", "kernel", "queue", "text"]

    def sentence(n: int) -> str:
        return " ".join(words[int(i)] for i in rng.integers(0, len(words), size=max(1, n)))

    convs = []
    for i in range(num_conversations):
        p, r = int(rng.lognormal(3.9, 1.0)), int(rng.lognormal(5.3, 0.8))
        convs.append({"id": f"synthetic-{i}", "conversations": [{"from": "human", "value": sentence(p)},
                                                                {"from": "gpt", "value": sentence(r)}]})
    path = Path(path)
    path.write_text(json.dumps(convs))
    return path


def interference_requests(tokenizer, args) -> list[ServeRequest]:
    rng = np.random.default_rng(args.seed)
    chats = [ServeRequest(t, n, args.interference_chat_output_len, group="chat")
             for t, n in (_random_text(tokenizer, rng, args.interference_chat_input_len)
                          for _ in range(args.num_prompts))]
    num_long = args.interference_num_long
    if num_long is None:
        span = args.num_prompts / args.request_rate if args.request_rate not in (0, float("inf")) else 0
        num_long = max(1, int(span / args.interference_long_interval))
    longs = []
    for k in range(num_long):
        text, n = _random_text(tokenizer, rng, args.interference_long_input_len)
        longs.append(ServeRequest(text, n, args.interference_long_output_len, group="long",
                                  send_at=args.interference_long_interval * (k + 0.5)))
    return chats + longs


def multi_turn_requests(tokenizer, args) -> list[ServeRequest]:
    if args.request_rate in (0, float("inf")):
        raise ValueError("--dataset-name multi-turn needs a finite --request-rate (it paces the turns)")
    rng = np.random.default_rng(args.seed)
    num_convs = args.multi_turn_conversations
    out = []
    for c in range(num_convs):
        history = _random_text(tokenizer, rng, args.multi_turn_context_len)[0]
        for k in range(args.multi_turn_turns):
            user = _random_text(tokenizer, rng, args.multi_turn_user_len)[0]
            prompt = history + user
            out.append(ServeRequest(prompt, _count(tokenizer, prompt), args.multi_turn_output_len,
                                    group=f"turn-{k}", send_at=(k * num_convs + c) / args.request_rate))
            history = prompt + _random_text(tokenizer, rng, args.multi_turn_reply_len)[0]
    return out


def build_requests(tokenizer, args) -> list[ServeRequest]:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE.json")
        return load_sharegpt(args.dataset_path, tokenizer, args.num_prompts, args.seed, args.sharegpt_output_len)
    build = {"random": random_requests, "prefix-repetition": prefix_repetition_requests,
             "shared-prefix": shared_prefix_requests, "interference": interference_requests,
             "multi-turn": multi_turn_requests}
    return build[args.dataset_name](tokenizer, args)
