"""Train an EAGLE head for tandem's demo model (speculative decoding, method ``eagle``).

    python scripts/train_eagle.py --out models/tandem-demo-eagle     # ~15 min on 2 CPU cores

The head is EAGLE-1's (Li et al., 2024) in the layout vLLM loads (``EagleLlamaForCausalLM``): at
position t it reads the target's final hidden state f_t (after the final norm) and the embedding of
token t + 1, ``fc`` maps their concatenation [embedding, feature] to the hidden size, and one Llama
decoder layer without its input norm predicts f_{t+1}; the target's own LM head turns that into the
draft token. Embeddings and LM head are the target's (not stored). Loss, as the paper: smooth L1
between the predicted and the true next feature plus ``--ce-weight`` x cross-entropy from the
target's next-token distribution, over random windows of the target's training stream
(``train_demo_model.py``'s data and seed), with uniform noise on the input features. At the end the
script serves the demo model with the head through tandem and measures greedy acceptance on the
held-out sample; the card and ``training_log.json`` record it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from train_demo_model import (  # a sibling script: its directory is on sys.path when run
    Recipe,
    chat_examples,
    interleave,
    read_split,
    render_chat,
    token_stream,
    train,
)

from tandem.testing import EAGLE_ARCHITECTURE, EagleHeadHF, eagle_head_config, save_eagle_head


def eagle_loss(teacher, ce_weight: float, noise: float):
    """loss_fn for ``train``: smooth L1 on the next feature + ce_weight x soft cross-entropy."""
    embed, lm_head = teacher.model.embed_tokens, teacher.lm_head

    def loss_fn(head: EagleHeadHF, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            features = teacher.model(input_ids=batch).last_hidden_state.float()  # f_t after the final norm
            target_logp = F.log_softmax(lm_head(features[:, 1:]).float(), dim=-1)
            inputs = features[:, :-1] + (torch.rand_like(features[:, :-1]) - 0.5) * 2 * noise
            embeds = embed(batch[:, 1:])
        predicted = head(embeds, inputs).float()
        regression = F.smooth_l1_loss(predicted, features[:, 1:])
        logp = F.log_softmax(lm_head(predicted).float(), dim=-1)
        ce = -(target_logp.exp() * logp).sum(-1).mean()
        accuracy = (logp.argmax(-1) == target_logp.argmax(-1)).float().mean()
        return regression + ce_weight * ce, {"l1": regression.item(), "ce": ce.item(), "top1": accuracy.item()}

    return loss_fn


def measure_acceptance(target: Path, head: Path, k: int, max_tokens: int = 128) -> dict:
    """Greedy acceptance with tandem on windows of the held-out sample (one request at a time)."""
    from tandem import LLM, SamplingParams

    llm = LLM(model=str(target), kv_cache_memory="64MiB",
              speculative_config={"method": "eagle", "model": str(head), "num_speculative_tokens": k,
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

# tandem-demo-eagle: an EAGLE head for tandem-demo

A {r['num_layers']}-layer EAGLE-1 head ({log['num_params']:,} parameters) that proposes tokens for
`models/tandem-demo` in speculative decoding
(`--speculative-config '{{"method": "eagle", "model": "models/tandem-demo-eagle"}}'`), in the checkpoint
layout vLLM loads (`{EAGLE_ARCHITECTURE}`: `fc.weight` over [token embedding, target feature], then
`layers.N.*`; embeddings and LM head are the target's). Trained on the demo model's own final hidden
states over its training stream (CPython {log['python_version']} standard library, the same split and
seed): loss = smooth L1 on the next feature + {log['ce_weight']} x cross-entropy from the target's
next-token distribution, input features with uniform noise of +-{log['noise']}, {r['steps']} steps of
{r['batch_size']} x {r['seq_len']} tokens, AdamW, peak LR {r['lr']}, cosine to {r['min_lr_ratio']}x. Wall time
{log['train']['wall_time_s'] / 60:.1f} min on {log['device']}.

Command: `{log['command']}`

## Acceptance (greedy, tandem, held-out code)

{acc['prompts']} windows of {acc['input_len']} tokens of `heldout-sample.txt` (files the demo model never saw),
{acc['output_len']} tokens out each, {acc['num_speculative_tokens']} drafts per step, every proposal verified:
acceptance length **{acc['acceptance_length']}** tokens per target step (acceptance rate
{acc['acceptance_rate']} per draft; accepted per position {acc['accepted_per_position']}).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/tandem-demo-eagle")
    parser.add_argument("--teacher", default="models/tandem-demo")
    parser.add_argument("--num-layers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ce-weight", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--measure-only", action="store_true", help="measure the saved head's acceptance")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher_dir, out = Path(args.teacher), Path(args.out)
    if not args.measure_only:
        write_log(out, train_head(args, teacher_dir, out))
    log = json.loads((out / "training_log.json").read_text())
    log["acceptance"] = measure_acceptance(teacher_dir, out, args.num_speculative_tokens)
    print(f"acceptance: {log['acceptance']}", flush=True)
    write_log(out, log)
    (out / "README.md").write_text(card(log))
    print(f"saved to {out}")


def train_head(args: argparse.Namespace, teacher_dir: Path, out: Path) -> dict:
    """Train and save the head; returns its training log (acceptance is measured after)."""
    teacher_log = json.loads((teacher_dir / "training_log.json").read_text())
    recipe = replace(Recipe(**teacher_log["recipe"]), num_layers=args.num_layers, steps=args.steps, lr=args.lr,
                     warmup_steps=min(20, args.steps // 10))
    rng = random.Random(recipe.seed)
    train_files, _ = read_split(recipe.heldout_pct)
    tok = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
    code = token_stream(tok, [t for _, t in train_files], rng)
    chat = token_stream(tok, [render_chat(c) for c in chat_examples(train_files)], rng, chat=True)
    stream = interleave(code, chat, rng)

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    config = eagle_head_config(teacher_dir, args.num_layers)
    torch.manual_seed(recipe.seed)
    head = EagleHeadHF(config)
    train_log = train(head, stream, recipe, loss_fn=eagle_loss(teacher, args.ce_weight, args.noise))
    save_eagle_head(out, head, config)

    from tandem.bench.throughput import describe_device

    return {
        "recipe": asdict(recipe), "teacher": str(teacher_dir), "ce_weight": args.ce_weight, "noise": args.noise,
        "num_params": sum(p.numel() for p in head.parameters()), "train": train_log,
        "device": describe_device("cpu"), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def write_log(out: Path, log: dict) -> None:
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
