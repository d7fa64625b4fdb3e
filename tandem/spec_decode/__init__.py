"""Speculative decoding building blocks (issue 25; not wired into the scheduler yet): exact
rejection sampling (``rejection.py``) and an n-gram proposer that stays O(1) per token on long
contexts (``ngram.py``)."""
