"""Speculative decoding (vLLM's ``speculative_config``; methods ``ngram``, ``draft_model`` and
``eagle``).

The scheduler asks its proposer for draft tokens that follow each decoding request:
``NgramProposer`` (``ngram.py``) looks them up in the request's own tokens,
``DraftModelProposals`` (``draft.py``) hands out what the draft model or EAGLE head in
the runner (tandem/runner/drafter.py, eagle_drafter.py) proposed during the previous step. ``SpeculationPlanner``
(``planner.py``) says how many of them are worth verifying this step (from measured acceptance and
step cost); the request's chunk is its last token plus the drafts.
The model runner scores all of them in one forward and ``rejection_sample`` (``rejection.py``)
keeps the accepted prefix plus one token from the target, so the output follows the target's
distribution exactly. The scheduler then advances the request by what was accepted and gives back
the blocks that only rejected drafts needed.
"""

from __future__ import annotations

from tandem.sampling_params import SamplingParams, SamplingType


def speculation_allowed(params: SamplingParams, num_output_tokens: int) -> bool:
    """Requests whose next tokens depend only on the model's distribution (and, with structured
    outputs, their grammar, which the scheduler checks drafts against) are speculated; the rest
    decode one token per step as before (their output is the same either way): penalties, logit
    bias and pending min_tokens (processing that reads each earlier token), and seeded requests
    (whose draws must not depend on how many drafts a step verified). Logprobs are reported for
    every accepted token, from the verifying forward's rows."""
    return not (params.logit_bias
                or params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
                or num_output_tokens < params.min_tokens or params.sampling_type == SamplingType.RANDOM_SEED)
