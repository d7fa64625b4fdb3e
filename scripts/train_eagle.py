"""Train an EAGLE head for tandem's demo model (speculative decoding, method ``eagle`` or ``eagle3``).

    python scripts/train_eagle.py                     # EAGLE-1, models/tandem-demo-eagle, ~15 min on 2 CPU cores
    python scripts/train_eagle.py --method eagle3 --steps 600     # EAGLE-3, models/tandem-demo-eagle3, ~20 min

The head is EAGLE-1's (Li et al., 2024) in the layout vLLM loads (``EagleLlamaForCausalLM``): at
position t it reads the target's final hidden state f_t (after the final norm) and the embedding of
token t + 1, ``fc`` maps their concatenation [embedding, feature] to the hidden size, and one Llama
decoder layer without its input norm predicts f_{t+1}; the target's own LM head turns that into the
draft token. Embeddings and LM head are the target's (not stored). Loss, as the paper: smooth L1
between the predicted and the true next feature plus ``--ce-weight`` x cross-entropy from the
target's next-token distribution, over random windows of the target's training stream
(``train_demo_model.py``'s data and seed), with uniform noise on the input features.

The EAGLE-3 head (``--method eagle3``, vLLM's ``LlamaForCausalLMEagle3`` layout) reads the target's
residual stream entering ``--aux-layers`` and predicts tokens with its own LM head (the full
vocabulary here; it starts as the target's). Loss: cross-entropy from the target's next-token
distribution over two unrolled steps, the second reading the first step's predictions as the
features of every position (EAGLE-3's training-time test, simplified: without its tree mask).

At the end the script serves the demo model with the head through tandem and measures greedy
acceptance on the held-out sample; the card and ``training_log.json`` record it.
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
from train_demo_model import Recipe, train, training_stream  # sibling scripts: their directory is on sys.path
from train_draft_model import measure_acceptance

from tandem.testing import (
    EAGLE3_ARCHITECTURE,
    EAGLE_ARCHITECTURE,
    Eagle3HeadHF,
    EagleHeadHF,
    eagle3_head_config,
    eagle_head_config,
    save_eagle3_head,
    save_eagle_head,
)


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


def eagle3_loss(teacher, aux_layers: list[int], second_step_weight: float):
    """loss_fn for an EAGLE-3 head: cross-entropy from the target's next-token distribution, over
    two unrolled steps (EAGLE-3's training-time test, simplified: the second step reads the first
    step's predictions as the features of every position, as drafting does for its later tokens)."""
    embed = teacher.model.embed_tokens

    def loss_fn(head: Eagle3HeadHF, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            out = teacher.model(input_ids=batch, output_hidden_states=True)
            aux = torch.cat([out.hidden_states[i] for i in aux_layers], dim=-1).float()
            target_logp = F.log_softmax(teacher.lm_head(out.last_hidden_state).float(), dim=-1)
            embeds = embed(batch)
        # step 1 at position t reads token t + 1 and the target at t, and predicts token t + 2
        first = head(embeds[:, 1:], head.fc(aux[:, :-1]))
        ce1, top1 = _soft_ce(head, first[:, :-1], target_logp[:, 1:-1])
        # step 2 at position t + 1 reads token t + 2 and step 1's prediction at t, and predicts token t + 3
        second = head(embeds[:, 2:], first[:, :-1])
        ce2, top2 = _soft_ce(head, second[:, :-1], target_logp[:, 2:-1])
        return ce1 + second_step_weight * ce2, {"ce1": ce1.item(), "ce2": ce2.item(), "top1": top1, "top1_step2": top2}

    return loss_fn


def _soft_ce(head: Eagle3HeadHF, predicted: torch.Tensor, target_logp: torch.Tensor) -> tuple[torch.Tensor, float]:
    logp = F.log_softmax(head.lm_head(head.norm(predicted)).float(), dim=-1)
    ce = -(target_logp.exp() * logp).sum(-1).mean()
    return ce, (logp.argmax(-1) == target_logp.argmax(-1)).float().mean().item()


def card(log: dict) -> str:
    r, acc = log["recipe"], log["acceptance"]
    method = log.get("method", "eagle")
    name = f"tandem-demo-{method}"
    if method == "eagle3":
        what = (f"An EAGLE-3 head ({log['num_params']:,} parameters) that proposes tokens for `models/tandem-demo` in "
                f"speculative decoding (`--speculative-config '{{\"method\": \"eagle3\", \"model\": \"models/{name}\"}}'`), "
                f"in the checkpoint layout vLLM loads (`{EAGLE3_ARCHITECTURE}`: `fc` over the target's residual stream "
                f"entering layers {log['aux_layers']}, `midlayer` over [embedding, feature], `norm`, its own `lm_head` "
                "over the full vocabulary, `d2t` all zeros). Its LM head and norm started as the target's.")
        loss = (f"loss = cross-entropy from the target's next-token distribution over two unrolled steps (the second "
                f"reads the first's predictions as features, weight {log['second_step_weight']})")
    else:
        what = (f"A {r['num_layers']}-layer EAGLE-1 head ({log['num_params']:,} parameters) that proposes tokens for "
                f"`models/tandem-demo` in speculative decoding (`--speculative-config '{{\"method\": \"eagle\", "
                f"\"model\": \"models/{name}\"}}'`), in the checkpoint layout vLLM loads (`{EAGLE_ARCHITECTURE}`: "
                "`fc.weight` over [token embedding, target feature], then `layers.N.*`; embeddings and LM head are "
                "the target's).")
        loss = (f"loss = smooth L1 on the next feature + {log['ce_weight']} x cross-entropy from the target's "
                f"next-token distribution, input features with uniform noise of +-{log['noise']}")
    return f"""---
license: psf-2.0
language: [code]
pipeline_tag: text-generation
---

# {name}: an {'EAGLE-3' if method == 'eagle3' else 'EAGLE'} head for tandem-demo

{what}

Trained on the demo model's own hidden states over its training stream (CPython {log['python_version']}
standard library, the same split and seed): {loss}; {r['steps']} steps of {r['batch_size']} x {r['seq_len']}
tokens, AdamW, peak LR {r['lr']}, cosine to {r['min_lr_ratio']}x. Wall time {log['train']['wall_time_s'] / 60:.1f} min
on {log['device']}.

Command: `{log['command']}`

## Acceptance (greedy, tandem, held-out code)

{acc['prompts']} windows of {acc['input_len']} tokens of `heldout-sample.txt` (files the demo model never saw),
{acc['output_len']} tokens out each, {acc['num_speculative_tokens']} drafts per step, every proposal verified:
acceptance length **{acc['acceptance_length']}** tokens per target step (acceptance rate
{acc['acceptance_rate']} per draft; accepted per position {acc['accepted_per_position']}).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("eagle", "eagle3"), default="eagle",
                        help="eagle: an EAGLE-1 head; eagle3: an EAGLE-3 head over --aux-layers (full vocabulary)")
    parser.add_argument("--aux-layers", default="1,3,4", help="eagle3: the target layers whose input it reads")
    parser.add_argument("--second-step-weight", type=float, default=0.5, help="eagle3: the unrolled step's loss")
    parser.add_argument("--out", default=None, help="default: models/tandem-demo-eagle (or -eagle3)")
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
    teacher_dir = Path(args.teacher)
    out = Path(args.out or f"models/tandem-demo-{args.method}")
    if not args.measure_only:
        write_log(out, train_head(args, teacher_dir, out))
    log = json.loads((out / "training_log.json").read_text())
    log["acceptance"] = measure_acceptance(teacher_dir, out, args.num_speculative_tokens, method=args.method)
    print(f"acceptance: {log['acceptance']}", flush=True)
    write_log(out, log)
    (out / "README.md").write_text(card(log))
    print(f"saved to {out}")


def train_head(args: argparse.Namespace, teacher_dir: Path, out: Path) -> dict:
    """Train and save the head; returns its training log (acceptance is measured after)."""
    teacher_log = json.loads((teacher_dir / "training_log.json").read_text())
    recipe = replace(Recipe(**teacher_log["recipe"]), num_layers=args.num_layers, steps=args.steps, lr=args.lr,
                     warmup_steps=min(20, args.steps // 10))
    tok = Tokenizer.from_file(str(teacher_dir / "tokenizer.json"))
    stream = training_stream(recipe, tok)

    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    torch.manual_seed(recipe.seed)
    if args.method == "eagle3":
        aux = [int(i) for i in args.aux_layers.split(",")]
        config = eagle3_head_config(teacher_dir, aux, tok.get_vocab_size())
        head3 = Eagle3HeadHF(config, len(aux), tok.get_vocab_size())
        head3.norm.weight.data.copy_(teacher.model.norm.weight)  # start from the target's LM head and norm
        head3.lm_head.weight.data.copy_(teacher.lm_head.weight)
        train_log = train(head3, stream, recipe, loss_fn=eagle3_loss(teacher, aux, args.second_step_weight))
        save_eagle3_head(out, head3, config)
        num_params = sum(p.numel() for p in head3.parameters())
    else:
        config = eagle_head_config(teacher_dir, args.num_layers)
        head = EagleHeadHF(config)
        train_log = train(head, stream, recipe, loss_fn=eagle_loss(teacher, args.ce_weight, args.noise))
        save_eagle_head(out, head, config)
        num_params = sum(p.numel() for p in head.parameters())

    from tandem.bench.throughput import describe_device

    return {
        "method": args.method, "recipe": asdict(recipe), "teacher": str(teacher_dir), "ce_weight": args.ce_weight,
        "noise": args.noise, "aux_layers": args.aux_layers, "second_step_weight": args.second_step_weight,
        "num_params": num_params, "train": train_log,
        "device": describe_device("cpu"), "torch_version": torch.__version__,
        "python_version": platform.python_version(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }


def write_log(out: Path, log: dict) -> None:
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
