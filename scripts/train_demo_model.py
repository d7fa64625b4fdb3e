"""Train tandem's bundled demo model on the Python standard library's own source (PSF license).

    python scripts/train_demo_model.py --out models/tandem-demo            # ~25 min on 2 CPU cores

Reproducible: the data split, tokenizer, initialisation and batch order depend only on --seed and
on the stdlib of the Python running the script (its version is written into the card). Steps:

1. corpus: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` except site-packages and test
   suites, sorted by path; a file is held out when sha256(relative path) mod 100 < --heldout-pct.
2. tokenizer: byte-level BPE (``tokenizers``), --vocab-size entries, special tokens for BOS, EOS,
   pad and chat roles, BOS added by the post-processor, a simple chat template.
3. chat examples: every documented top-level function of the training files becomes a
   (docstring -> function source) conversation, so the chat endpoint answers with code.
4. model: Llama architecture (GQA, tied embeddings, RoPE), trained with AdamW + cosine schedule on
   random windows of the shuffled, packed token stream; held-out perplexity at the end.
5. output: a Hugging Face directory (config.json, model.safetensors, tokenizer files,
   generation_config.json), a held-out text sample for tests, training_log.json and README.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Tools as a system turn and an assistant's calls as <tool_call>{...}</tool_call> (tandem's
# --tool-call-parser hermes); tandem.testing.CHAT_TEMPLATE renders tools the same way.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>{{ '\\n' }}Call a function as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. Functions:{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% for call in m['tool_calls'] or [] %}<tool_call>{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}</tool_call>{% endfor %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Recipe:
    seed: int = 0
    vocab_size: int = 8192
    heldout_pct: int = 3
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 700
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_position_embeddings: int = 2048
    eval_windows: int = 160
    bf16_autocast: int = 1  # CPU autocast: bf16 matmuls (AMX where present), fp32 master weights


# --------------------------------------------------------------------------- data


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    return root, files


def is_heldout(rel: str, pct: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 100 < pct


def read_split(pct: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, heldout) lists of (relative path, text); undecodable files are skipped."""
    root, files = stdlib_files()
    train, heldout = [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(root).as_posix()
        (heldout if is_heldout(rel, pct) else train).append((rel, text))
    return train, heldout


def is_generated(text: str) -> bool:
    """Codec tables written by gencodec.py: near-identical across files, so scoring them held out
    would mostly measure memorisation of the training copies."""
    return "gencodec.py" in text[:2000]


def chat_examples(files: list[tuple[str, str]], max_chars: int = 1500) -> list[list[dict]]:
    """One conversation per documented top-level function: the docstring asks, the code answers."""
    conversations = []
    for _, text in files:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef):
                continue
            doc = ast.get_docstring(node)
            source = ast.get_source_segment(text, node)
            if not doc or not source or len(source) > max_chars:
                continue
            summary = doc.strip().split("\n\n")[0].replace("\n", " ")
            ask = f"Write a Python function `{node.name}`: {summary}"
            conversations.append([{"role": "user", "content": ask}, {"role": "assistant", "content": source}])
    return conversations


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def hf_tokenizer(tok, max_len: int = Recipe.max_position_embeddings):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=list(ROLE_TOKENS), chat_template=CHAT_TEMPLATE,
                                   model_max_length=max_len)


_TEMPLATE = ImmutableSandboxedEnvironment().from_string(CHAT_TEMPLATE)


def render_chat(conversation: list[dict]) -> str:
    return _TEMPLATE.render(messages=conversation, bos_token=BOS, eos_token=EOS,
                                                add_generation_prompt=False)


def token_stream(tok, documents: list[str], rng: random.Random, chat: bool = False) -> torch.Tensor:
    """Shuffled documents packed into one stream; code documents as BOS + text + EOS."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    # chat documents already carry BOS/EOS from the template
    encs = tok.encode_batch([documents[i] for i in order], add_special_tokens=not chat)
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in encs:
        ids.extend(enc.ids)
        if not chat:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def interleave(code: torch.Tensor, chat: torch.Tensor, rng: random.Random, pieces: int = 64) -> torch.Tensor:
    """Spread the chat stream through the code stream in `pieces` runs (so both are seen all along)."""
    code_parts, chat_parts = torch.tensor_split(code, pieces), torch.tensor_split(chat, pieces)
    mixed = [p for pair in zip(code_parts, chat_parts) for p in pair]
    return torch.cat(mixed)


# --------------------------------------------------------------------------- model


def training_stream(recipe: Recipe, tok) -> torch.Tensor:
    """The demo model's training stream (its split, code and chats, seed), for the scripts that
    train from it (draft model, EAGLE heads)."""
    rng = random.Random(recipe.seed)
    train_files, _ = read_split(recipe.heldout_pct)
    code = token_stream(tok, [t for _, t in train_files], rng)
    chat = token_stream(tok, [render_chat(c) for c in chat_examples(train_files)], rng, chat=True)
    return interleave(code, chat, rng)


def build_model(recipe: Recipe, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_kv_heads,
        head_dim=recipe.hidden_size // recipe.num_heads, max_position_embeddings=recipe.max_position_embeddings,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD), dtype="float32", attn_implementation="sdpa",
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    progress = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.inference_mode()
def per_file_perplexity(model, tok, files: list[tuple[str, str]], window: int) -> tuple[float, int]:
    """What `tandem eval perplexity MODEL FILES --window W` computes: each file tokenized as a prompt
    (BOS first), non-overlapping windows of W, every token but a window's first scored."""
    from tandem.eval.perplexity import windows

    model.eval()
    nll, count = 0.0, 0
    for _, text in files:
        for w in windows(tok(text)["input_ids"], window):
            ids = torch.tensor([w])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            nll -= lp.gather(-1, ids[0, 1:, None]).sum().item()
            count += len(w) - 1
    if not count:
        raise ValueError("no held-out token to score: raise --heldout-pct")
    return math.exp(nll / count), count


def evaluate(out: Path, log: dict, heldout_files: list[tuple[str, str]], window: int) -> None:
    """Held-out perplexity of the saved model (all held-out files, and without generated codec
    tables), a held-out text sample for tests, a greedy sample; rewrites training_log.json and the card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    handwritten = [(n, t) for n, t in heldout_files if not is_generated(t)]
    ppl_all, n_all = per_file_perplexity(model, tok, heldout_files, window)
    ppl_hand, n_hand = per_file_perplexity(model, tok, handwritten, window)
    log["results"].update({
        "heldout_perplexity": ppl_hand, "heldout_tokens_scored": n_hand,
        "heldout_files_scored": [n for n, _ in handwritten],
        "heldout_perplexity_incl_generated": ppl_all, "heldout_tokens_scored_incl_generated": n_all,
        "eval_window": window,
    })
    prompt = tok("def fibonacci(n):", return_tensors="pt")
    with torch.inference_mode():
        sample = model.generate(**prompt, max_new_tokens=64, do_sample=False)
    log["sample_completion"] = tok.decode(sample[0], skip_special_tokens=True)
    name, text = sorted(handwritten)[0]
    cut = text[:12000]
    (out / "heldout-sample.txt").write_text(cut[:cut.rfind("\n") + 1])
    log["heldout_sample_file"] = name
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (out / "README.md").write_text(model_card(log))
    print(f"held-out perplexity {ppl_hand:.3f} over {n_hand:,} tokens "
          f"({ppl_all:.3f} over {n_all:,} with generated codec tables)", flush=True)


@torch.inference_mode()
def heldout_perplexity(model, stream: torch.Tensor, seq_len: int, max_windows: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows; the first token of each window is not scored."""
    model.eval()
    nll, count = 0.0, 0
    n = min(max_windows, len(stream) // seq_len)
    if n == 0:
        return float("nan"), 0
    for w in range(0, n, 8):
        batch = torch.stack([stream[i * seq_len:(i + 1) * seq_len] for i in range(w, min(n, w + 8))])
        logits = model(input_ids=batch).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, batch[:, 1:, None]).squeeze(-1)
        nll -= lp.sum().item()
        count += lp.numel()
    model.train()
    return math.exp(nll / count), count


def train(model, stream: torch.Tensor, r: Recipe, log_every: int = 25, loss_fn=None) -> dict:
    """AdamW over random windows of ``stream``. loss_fn(model, batch) -> (loss, {name: value} to log)
    replaces next-token cross-entropy (scripts/train_draft_model.py distils with it)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(r.seed)
    model.train()
    history, start, ema = [], time.perf_counter(), None
    for step in range(r.steps):
        starts = torch.randint(0, len(stream) - r.seq_len - 1, (r.batch_size,), generator=gen)
        batch = torch.stack([stream[s:s + r.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(r.bf16_autocast)):
            loss, parts = loss_fn(model, batch) if loss_fn else (model(input_ids=batch, labels=batch).loss, {})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0 or step == r.steps - 1:
            elapsed = time.perf_counter() - start
            tok_s = (step + 1) * r.batch_size * r.seq_len / elapsed
            history.append({"step": step, "loss": round(loss.item(), 4), "loss_ema": round(ema, 4),
                            **{k: round(v, 4) for k, v in parts.items()},
                            "lr": lr_at(step, r), "elapsed_s": round(elapsed, 1), "tokens_per_s": round(tok_s)})
            shown = "".join(f" {k} {v:.3f}" for k, v in parts.items())
            print(f"step {step:5d}  loss {loss.item():.3f} (ema {ema:.3f}){shown}  {tok_s:,.0f} tok/s  "
                  f"{elapsed:,.0f}s", flush=True)
    wall = time.perf_counter() - start
    return {"history": history, "wall_time_s": round(wall, 1),
            "tokens_seen": r.steps * r.batch_size * r.seq_len,
            "tokens_per_s": round(r.steps * r.batch_size * r.seq_len / wall), "final_loss_ema": round(ema, 4)}


# --------------------------------------------------------------------------- output


def save(out: Path, model, tok) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    hf_tok = hf_tokenizer(tok, model.config.max_position_embeddings)
    hf_tok.save_pretrained(str(out), save_jinja_files=False)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE  # kept in tokenizer_config.json, as older loaders expect
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def model_card(log: dict) -> str:
    r, res = log["recipe"], log["results"]
    rows = "\n".join(f"| {h['step']} | {h['loss_ema']:.3f} | {h['tokens_per_s']:,} |" for h in log["train"]["history"][::4])
    return f"""---
license: psf-2.0
language: [code]
pipeline_tag: text-generation
---

# tandem-demo: a {res['num_params'] / 1e6:.1f}M-parameter Llama trained on the Python standard library

tandem's bundled default model: small enough to ship in the repository and to serve on a laptop CPU,
trained enough that its completions are recognisably Python. It is a demo and a test fixture, not an
assistant: it knows Python syntax and stdlib idioms, nothing else.

## Model

Llama architecture (loads with transformers' `AutoModelForCausalLM` and with tandem): {r['num_layers']} layers,
hidden {r['hidden_size']}, MLP {r['intermediate_size']}, {r['num_heads']} attention heads of dim
{r['hidden_size'] // r['num_heads']}, {r['num_kv_heads']} KV heads (GQA), RoPE (theta 10000), tied embeddings,
context {r['max_position_embeddings']} (trained on windows of {r['seq_len']}), float32 weights,
{res['num_params']:,} parameters.

Tokenizer: byte-level BPE trained on the same training split, {res['vocab_size']} entries, special tokens
`<|bos|>` (added to every prompt), `<|eos|>`, `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`. Chat
template: `<|bos|><|user|>\\n...<|eos|>\\n<|assistant|>\\n`.

## Data

Every `*.py` file of the CPython {log['python_version']} standard library (site-packages and test suites
excluded), license PSF-2.0. A file is held out when sha256(its path relative to the stdlib) mod 100 <
{r['heldout_pct']}: {log['data']['train_files']} training files ({log['data']['train_tokens']:,} tokens),
{log['data']['heldout_files']} held-out files ({log['data']['heldout_tokens']:,} tokens). Each documented
top-level function of the training files also appears as a conversation (user: "Write a Python function
`name`: <docstring summary>", assistant: the source): {log['data']['chat_examples']:,} conversations,
{log['data']['chat_tokens']:,} tokens. `heldout-sample.txt` is the start of the held-out text, for tests.

## Training

`python scripts/train_demo_model.py --out models/tandem-demo` (seed {r['seed']}). AdamW (betas 0.9/0.95,
weight decay {r['weight_decay']}), peak LR {r['lr']} after {r['warmup_steps']} warm-up steps, cosine to
{r['min_lr_ratio']}x, gradient clipping {r['grad_clip']}, {r['steps']} steps of {r['batch_size']} x
{r['seq_len']} random windows of the packed, shuffled stream: {log['train']['tokens_seen']:,} tokens.

Matmuls in bf16 under CPU autocast (fp32 master weights and optimizer state): {bool(r.get('bf16_autocast', 1))}.
Run: {log['device']} ({log.get('torch_threads', 2)} torch threads), torch {log['torch_version']}, {log['date']}.
Wall time {log['train']['wall_time_s'] / 60:.1f} min, {log['train']['tokens_per_s']:,} training tokens/s. Float
rounding differs across CPUs and thread counts, so a re-run matches these numbers closely, not bit for bit.
{log.get('notes', '')}

| step | training loss (EMA) | tokens/s |
|---:|---:|---:|
{rows}

## Results

Held-out perplexity: **{res['heldout_perplexity']:.2f}** per token over {res['heldout_tokens_scored']:,} tokens of
the {len(res['heldout_files_scored'])} hand-written held-out files ({res['heldout_perplexity_incl_generated']:.2f}
over {res['heldout_tokens_scored_incl_generated']:,} tokens when the held-out generated codec tables, near-copies of
training files, are included). Uniform over the vocabulary would be {res['vocab_size']}. Each file is
scored as a prompt (BOS first) in non-overlapping windows of {res['eval_window']} tokens, every token but a
window's first scored: exactly what tandem's engine computes with

    tandem eval perplexity models/tandem-demo FILE... --window {res['eval_window']}

(`training_log.json` lists the files.) Caveat: `lib2to3/pgen2/tokenize.py` (held out) is a near-copy of
`tokenize.py` (trained on).

Greedy completion of `def fibonacci(n):`:

```python
{log['sample_completion']}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/tandem-demo")
    for name, value in asdict(Recipe()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--eval-only", action="store_true",
                        help="re-run the held-out evaluation of an already trained --out and rewrite its card")
    args = parser.parse_args()
    recipe = Recipe(**{k: getattr(args, k) for k in asdict(Recipe())})
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(recipe.seed)

    t0 = time.perf_counter()
    train_files, heldout_files = read_split(recipe.heldout_pct)
    if not heldout_files:
        raise SystemExit("no held-out file: raise --heldout-pct")
    if args.eval_only:
        log = json.loads((Path(args.out) / "training_log.json").read_text())
        evaluate(Path(args.out), log, heldout_files, log["recipe"]["seq_len"])
        return
    conversations = chat_examples(train_files)
    tok = train_tokenizer([t for _, t in train_files], recipe.vocab_size)
    code = token_stream(tok, [t for _, t in train_files], rng)
    chat = token_stream(tok, [render_chat(c) for c in conversations], rng, chat=True)
    stream = interleave(code, chat, rng)
    heldout = token_stream(tok, [t for _, t in heldout_files], random.Random(recipe.seed))
    print(f"data: {len(train_files)} train files ({len(code):,} tokens), {len(conversations)} chats "
          f"({len(chat):,} tokens), {len(heldout_files)} held-out files ({len(heldout):,} tokens); "
          f"{time.perf_counter() - t0:.0f}s", flush=True)

    model = build_model(recipe, tok)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params:,} parameters", flush=True)
    train_log = train(model, stream, recipe)
    ppl, scored = heldout_perplexity(model, heldout, recipe.seq_len, recipe.eval_windows)
    print(f"held-out stream perplexity {ppl:.3f} over {scored:,} tokens", flush=True)

    from tandem.bench.throughput import describe_device

    log = {
        "recipe": asdict(recipe),
        "data": {"train_files": len(train_files), "train_tokens": len(code), "heldout_files": len(heldout_files),
                 "heldout_tokens": len(heldout), "chat_examples": len(conversations), "chat_tokens": len(chat),
                 "heldout_file_names": [name for name, _ in heldout_files]},
        "train": train_log,
        "results": {"num_params": num_params, "vocab_size": tok.get_vocab_size(),
                    "heldout_stream_perplexity": ppl, "heldout_stream_tokens_scored": scored},
        "device": describe_device("cpu"),
        "cpu_flags": sorted(set(_cpu_flags()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    save(Path(args.out), model, tok)
    evaluate(Path(args.out), log, heldout_files, recipe.seq_len)
    print(f"saved to {args.out}")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


if __name__ == "__main__":
    main()
