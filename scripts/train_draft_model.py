"""Train a draft model for tandem's demo model (speculative decoding, method ``draft_model``).

    python scripts/train_draft_model.py --out models/tandem-demo-draft     # ~10 min on 2 CPU cores

The draft shares the target's tokenizer (copied, not retrained) and starts as the target cut to its
first ``--num-layers`` decoder layers (embeddings, those layers and the final norm copied). It is
then distilled: the loss is the KL divergence from the target's next-token distribution (weight
``--kl-weight``) plus cross-entropy on the text, over random windows of the target's own training
stream (``train_demo_model.py``'s data, same seed). At the end the script serves both with tandem
and measures greedy acceptance on the held-out sample; the card and ``training_log.json`` record it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from train_demo_model import (  # a sibling script: its directory is on sys.path when run
    Recipe,
    build_model,
    save,
    train,
    training_stream,
)


def load_teacher(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def init_from_teacher(student, teacher) -> None:
    """Embeddings, the first decoder layers and the final norm from the target (same widths)."""
    student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
    student.model.norm.weight.copy_(teacher.model.norm.weight)
    for mine, theirs in zip(student.model.layers, teacher.model.layers):
        mine.load_state_dict(theirs.state_dict())


def distillation_loss(teacher, kl_weight: float):
    """loss_fn for ``train``: kl_weight x KL(teacher || student) + the rest x cross-entropy."""

    def loss_fn(student, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=batch).logits.float(), dim=-1)
        out = student(input_ids=batch, labels=batch)
        logp = F.log_softmax(out.logits.float(), dim=-1)
        kl = F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")
        return kl_weight * kl + (1 - kl_weight) * out.loss, {"kl": kl.item(), "ce": out.loss.item()}

    return loss_fn


def measure_acceptance(target: Path, draft: Path, k: int, max_tokens: int = 128, method: str = "draft_model") -> dict:
    """Greedy acceptance with tandem on windows of the held-out sample (one request at a time);
    method: draft_model, or eagle / eagle3 for a head (scripts/train_eagle.py)."""
    from tandem import LLM, SamplingParams

    llm = LLM(model=str(target), kv_cache_memory="64MiB",
              speculative_config={"method": method, "model": str(draft), "num_speculative_tokens": k,
                                  "adaptive": False})
    ids = llm.get_tokenizer().encode((target / "heldout-sample.txt").read_text())
    prompts = [ids[i * 300:i * 300 + 256] for i in range(8) if len(ids) >= i * 300 + 256]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
    stats = llm.llm_engine.scheduler.planner.stats
    return {"num_speculative_tokens": k, "prompts": len(prompts), "input_len": 256, "output_len": max_tokens,
            "acceptance_length": round(stats.acceptance_length, 3),
            "acceptance_rate": round(stats.num_accepted_tokens / max(1, stats.num_draft_tokens), 3),
            "accepted_per_position": stats.accepted_per_pos, "verified_steps": stats.num_drafts}


def card(log: dict) -> str:
    r, acc = log["recipe"], log["acceptance"]
    return f"""---
license: psf-2.0
language: [code]
pipeline_tag: text-generation
---

# tandem-demo-draft: a draft model for tandem-demo

A {r['num_layers']}-layer Llama ({log['num_params']:,} parameters) that proposes tokens for `models/tandem-demo`
in speculative decoding (`--speculative-config '{{"method": "draft_model", "model": "models/tandem-demo-draft"}}'`).
It has the demo model's tokenizer (copied) and started as the demo model cut to its first {r['num_layers']}
decoder layers; it was then distilled on the demo model's training stream (CPython
{log['python_version']} standard library, the same split and seed): loss = {log['kl_weight']} x KL(target || draft)
+ {1 - log['kl_weight']:.2f} x cross-entropy, {r['steps']} steps of {r['batch_size']} x {r['seq_len']} tokens, AdamW,
peak LR {r['lr']}, cosine to {r['min_lr_ratio']}x. Wall time {log['train']['wall_time_s'] / 60:.1f} min on
{log['device']}.

Command: `{log['command']}`

## Acceptance (greedy, tandem, held-out code)

{acc['prompts']} windows of {acc['input_len']} tokens of `heldout-sample.txt`, {acc['output_len']} tokens out each,
{acc['num_speculative_tokens']} drafts per step, every proposal verified: acceptance length **{acc['acceptance_length']}**
tokens per target step (acceptance rate {acc['acceptance_rate']} per draft; accepted per position
{acc['accepted_per_position']}). Before distillation (the cut model alone): {log['acceptance_before']['acceptance_length']}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/tandem-demo-draft")
    parser.add_argument("--teacher", default="models/tandem-demo")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=0.9)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_dir, out = Path(args.teacher), Path(args.out)
    teacher_log = json.loads((teacher_dir / "training_log.json").read_text())
    recipe = replace(Recipe(**teacher_log["recipe"]), num_layers=args.num_layers, steps=args.steps, lr=args.lr,
                     warmup_steps=min(20, args.steps // 10))
    tok = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
    stream = training_stream(recipe, tok)

    teacher = load_teacher(teacher_dir)
    student = build_model(recipe, tok)
    init_from_teacher(student, teacher)
    save(out, student, tok)
    before = measure_acceptance(teacher_dir, out, args.num_speculative_tokens)
    print(f"acceptance of the cut model: {before}", flush=True)
    train_log = train(student, stream, recipe, loss_fn=distillation_loss(teacher, args.kl_weight))
    save(out, student, tok)
    after = measure_acceptance(teacher_dir, out, args.num_speculative_tokens)
    print(f"acceptance after distillation: {after}", flush=True)

    from tandem.bench.throughput import describe_device

    log = {
        "recipe": asdict(recipe), "teacher": str(teacher_dir), "kl_weight": args.kl_weight,
        "num_params": sum(p.numel() for p in student.parameters()), "train": train_log,
        "acceptance_before": before, "acceptance": after, "device": describe_device("cpu"),
        "torch_version": torch.__version__, "python_version": platform.python_version(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    (out / "README.md").write_text(card(log))
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
