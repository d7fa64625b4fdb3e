"""How many KV blocks fit: on a GPU, from the activation peak measured in a profile step at the
largest batch the scheduler may form; elsewhere from a configured byte budget.

Budget on CUDA (bytes): total x gpu_memory_utilization - in use before the profile (weights, the
CUDA context, other processes) - the profile's activation peak - a reserve for the decode CUDA
graphs' pool. The profile step is a prefill of ``max_num_batched_tokens`` tokens spread over
``max_num_seqs`` sequences (so the logits and sampler rows are at their widest too).
"""

from __future__ import annotations

from tandem.sampling_params import SamplingParams
from tandem.scheduler_output import NewRequestData, ScheduledChunk, SchedulerOutput
from tandem.utils import cdiv

GRAPH_POOL_RESERVE = 512 * 2**20
PROFILE_PREFIX = "__profile__"


def gpu_kv_budget(total: int, utilization: float, in_use_before: int, peak_activation: int,
                  reserve: int = GRAPH_POOL_RESERVE) -> int:
    budget = int(total * utilization) - in_use_before - peak_activation - reserve
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: {utilization:.2f} x {total / 2**30:.1f} GiB leaves "
            f"{budget / 2**30:.2f} GiB after {in_use_before / 2**30:.1f} GiB in use (weights, other processes), "
            f"{peak_activation / 2**30:.2f} GiB of activations at the largest batch and "
            f"{reserve / 2**30:.2f} GiB for CUDA graphs; raise gpu_memory_utilization or lower "
            f"max_num_batched_tokens / max_num_seqs")
    return budget


def profile_batch(num_tokens: int, num_seqs: int, block_size: int) -> tuple[SchedulerOutput, int]:
    """A prefill step of num_tokens tokens over min(num_seqs, num_tokens) sampled sequences, on
    blocks 0..n-1 -> (the step, n blocks it writes)."""
    n = min(num_seqs, num_tokens)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)  # the filtering path of the sampler
    out = SchedulerOutput()
    next_block = 0
    for i in range(n):
        length = num_tokens // n + (i < num_tokens % n)
        blocks = cdiv(length, block_size)
        rid = f"{PROFILE_PREFIX}{i}"
        tokens = [0] * length
        out.new_requests.append(NewRequestData(rid, tokens, params))
        out.chunks.append(ScheduledChunk(rid, tokens, 0, list(range(next_block, next_block + blocks)), True, length))
        next_block += blocks
    return out, next_block
