"""Continuous-batching scheduler: one token budget per step, shared by decodes and prefill chunks.

Plain Python over plain data (no torch, no sockets). Each step:
1. running requests, in order, get the tokens they still need (1 for a decode, a chunk for an
   unfinished prefill), within the budget; when blocks run out the lowest-priority running request
   is preempted (its blocks freed, recomputed later from its tokens, so its output is unchanged);
2. if nothing was preempted, waiting requests are admitted in policy order, after a prefix-cache
   lookup, while budget, ``max_num_seqs`` and blocks last.

Speculative decoding (``speculative``, tandem/spec_decode): after step 1 (when nothing was
preempted), each running request that only decodes gets draft tokens from the proposer, as many as
the planner finds worth their cost, from the budget and blocks left; its chunk is its last token
plus the drafts, and ``update_from_output`` appends the accepted
tokens, advances by them and gives back blocks only rejected drafts needed. With a draft model
the proposals come from the runner's previous step: each sampling chunk of a request that may
speculate next gets lookahead blocks (from what is left after admission) for the drafter's
proposals, given back after the step.

KV connector (disaggregation; ``tandem.kv_transfer.base`` has the hooks): after the local prefix
lookup the connector may claim more of a waiting request's prompt (``get_num_new_matched_tokens``);
the request then gets blocks for its prompt and waits (WAITING_FOR_REMOTE_KVS, in the connector's
``loading``) until ``take_finished`` hands it back, loaded (admitted like a prefix hit with one
prompt token left to compute) or not (computed here, or ended with an error). A finished request's
blocks go to ``request_finished``, which may keep them (a lease, a load still writing) and hand
them back later. The connector's state and counters are its own; with none, none of this runs.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Iterable, Mapping

from tandem.config import SchedulerConfig, SpeculativeConfig
from tandem.engine.block_pool import KVCacheBlock
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus
from tandem.kv_transfer.base import KVConnectorBase, refuse_kv_transfer
from tandem.scheduler_output import PLACEHOLDER_TOKEN, NewRequestData, ScheduledChunk, SchedulerOutput
from tandem.spec_decode import speculation_allowed
from tandem.spec_decode.draft import DraftModelProposals
from tandem.spec_decode.ngram import NgramProposer
from tandem.spec_decode.planner import SpeculationPlanner, truncate_plan


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 connector: KVConnectorBase | None = None, speculative: SpeculativeConfig | None = None) -> None:
        self.config = config
        self.connector = connector  # e.g. tandem.kv_transfer.connector.KVConnector; None: no KV transfer
        self.kv = kv
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept in policy order
        self.running: list[Request] = []
        self._seen_by_runner: set[str] = set()
        self._finished_since_last_step: set[str] = set()
        self._order = itertools.count()  # tie-breaker for the priority order
        self._serials = itertools.count(1)  # Request.serial
        self._order_key: dict[str, tuple] = {}
        self.num_preemptions = 0
        self.speculative = speculative
        self.proposer: NgramProposer | DraftModelProposals | None = None
        if speculative is not None:
            self.proposer = (DraftModelProposals() if speculative.method in ("draft_model", "eagle", "eagle3")
                             else NgramProposer(speculative.prompt_lookup_min, speculative.prompt_lookup_max))
        self.planner = (SpeculationPlanner(speculative.num_speculative_tokens, speculative.adaptive)
                        if speculative is not None else None)
        self._drafts: dict[str, list[int]] = {}  # this step's draft tokens per request
        self._lookahead: dict[str, int] = {}  # draft model: drafts to propose after this step, per request
        # a decode step's policy (drafts proposed or not), for the planner's measurement; None: not
        # a decode step, or no speculation
        self.last_step_speculated: bool | None = None

    # -- request lifecycle ---------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        if self.connector is not None:
            self.connector.add_request(request)
        else:
            refuse_kv_transfer(request)
        request.serial = next(self._serials)
        self.requests[request.request_id] = request
        self._order_key[request.request_id] = self._policy_key(request)
        self._enqueue_waiting(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus,
                        stop_reason: int | str | None = None) -> list[Request]:
        """End requests from outside the step (abort, stop string). Unknown ids are ignored."""
        assert status.finished
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            # else it waits for its KV: request_finished parks its blocks until the load's result
            req.stop_reason = stop_reason
            self._finish(req, status)
            done.append(req)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_runnable_requests(self) -> bool:
        """Requests a step could compute (not only ones waiting for remote KV or for their grammar
        to compile: the core process then polls instead of spinning)."""
        return bool(self.running) or any(r.structured is None or r.structured.ready for r in self.waiting)

    def has_pending_transfers(self) -> bool:
        """The connector still loads KV or keeps blocks (leases, aborted loads)."""
        return self.connector is not None and self.connector.has_pending()

    @property
    def loading(self) -> Mapping[str, Request]:
        """Request id -> request waiting for its KV from the connector (read-only)."""
        return self.connector.loading if self.connector is not None else {}

    @property
    def num_loading(self) -> int:
        return len(self.loading)

    def transfer_state(self) -> tuple:
        """Changes when the connector's loads or kept blocks change (idle-time /metrics updates)."""
        return self.connector.transfer_state() if self.connector is not None else ()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- the step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_since_last_step)
        self._finished_since_last_step = set()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}
        self.last_step_speculated = None
        preempted = self._schedule_running(scheduled, budget)
        budget -= sum(scheduled.values())
        if not preempted:
            budget -= self._schedule_drafts(scheduled, budget)
            self._schedule_waiting(scheduled, budget)
            self._reserve_lookahead(scheduled)
        out.preempted_request_ids = [r.request_id for r in preempted]
        for req in self.running:
            n = scheduled.get(req.request_id)
            if n:
                chunk = self._make_chunk(req, n)
                out.chunks.append(chunk)
                req.num_in_flight_tokens += n
                req.num_pending_tokens += chunk.sample
                if req.request_id not in self._seen_by_runner:
                    self._seen_by_runner.add(req.request_id)
                    out.new_requests.append(
                        NewRequestData(req.request_id, req.prompt_token_ids, req.sampling_params))
        self._drafts, self._lookahead = {}, {}
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta(out)
        return out

    def _schedule_drafts(self, scheduled: dict[str, int], budget: int) -> int:
        """Speculation, after every running request has its token: draft tokens for those that
        decode one, from the budget and the blocks left (a draft never takes another request's
        room, and never preempts). Returns the budget used."""
        used = 0
        for rid, drafts in self._plan_drafts(scheduled).items():
            drafts = drafts[:budget - used]
            if drafts and self.kv.allocate_slots(self.requests[rid], 1 + len(drafts)):
                self._drafts[rid] = drafts
                scheduled[rid] += len(drafts)
                used += len(drafts)
        if self.last_step_speculated and not used:
            self.last_step_speculated = None  # no draft to verify: this step measures neither policy
        return used

    def _plan_drafts(self, scheduled: dict[str, int]) -> dict[str, list[int]]:
        """Draft tokens worth verifying for the running requests scheduled to decode one token."""
        if self.proposer is None or self.planner is None:
            return {}
        num_decodes = sum(1 for n in scheduled.values() if n == 1)
        if num_decodes == len(scheduled):  # a decode step: the measured policy decides (and is measured)
            self.last_step_speculated = self.planner.speculate_now(num_decodes)
            if not self.last_step_speculated:
                return {}
        elif not self.planner.speculation_measured_better(num_decodes):
            return {}
        max_drafts = self.planner.max_drafts
        proposals: dict[str, list[int]] = {}
        for req in self.running:
            if scheduled.get(req.request_id) != 1 or not self._decodes_alone(req):
                continue
            # NOTE: no draft past max_tokens or max_model_len: every emitted token must be one the
            # request could have sampled
            room = min(max_drafts, req.max_tokens - req.num_output_tokens - 1, self.max_model_len - req.num_tokens - 1)
            proposal = self.proposer.propose(req.request_id, req.all_token_ids, room) if room > 0 else []
            if proposal and req.structured is not None:  # only drafts its grammar allows
                proposal = proposal[:req.structured.valid_prefix(proposal)]
            if proposal:
                proposals[req.request_id] = proposal
        if not proposals:
            return {}
        plan = self.planner.plan({rid: len(p) for rid, p in proposals.items()}, sum(scheduled.values()),
                                 len(scheduled))
        return truncate_plan(plan, proposals)

    def _reserve_lookahead(self, scheduled: dict[str, int]) -> None:
        """Draft model: blocks for the drafter's proposals past each chunk that samples, for requests
        that may speculate in the next step, from the blocks left after admission (a proposal never
        takes another request's room; without free blocks the request proposes nothing)."""
        if not isinstance(self.proposer, DraftModelProposals) or self.planner is None:
            return
        if not self.planner.speculates_next(len(scheduled)):
            return
        for req in self.running:
            n = scheduled.get(req.request_id)
            if not n:
                continue
            end = req.num_computed_tokens + req.num_in_flight_tokens + n  # position after the chunk
            samples = end - len(self._drafts.get(req.request_id, ())) == req.num_tokens + req.num_pending_tokens
            # NOTE: the next step's drafts stay within max_tokens and max_model_len, as in _plan_drafts
            room = min(self.planner.max_drafts, req.max_tokens - req.num_output_tokens - 2,
                       self.max_model_len - end - 2)
            if (samples and room > 0
                    and speculation_allowed(req.sampling_params, req.num_output_tokens + 1)
                    and self.kv.allocate_slots(req, req.num_in_flight_tokens + n + room)):
                self._lookahead[req.request_id] = room

    def _decodes_alone(self, req: Request) -> bool:
        """Computed up to its last token, nothing in flight, and speculation allowed for it."""
        return (req.num_pending_tokens == 0 and req.num_in_flight_tokens == 0
                and req.num_computed_tokens == req.num_tokens - 1
                and speculation_allowed(req.sampling_params, req.num_output_tokens))

    def _schedule_running(self, scheduled: dict[str, int], budget: int) -> list[Request]:
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(self._num_unscheduled(req), budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(req, req.num_in_flight_tokens + num_new):
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1  # an already scheduled request gives back its budget and its slot
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = num_new
                budget -= num_new
                i += 1
            # when req itself was preempted, running[i] is already the next request
        return preempted

    def _schedule_waiting(self, scheduled: dict[str, int], budget: int) -> None:
        prefilling_parents = {r.parent_id for r in self.running
                              if r.parent_id and self._computes_shared_prompt(r)
                              and r.num_computed_tokens + scheduled.get(r.request_id, 0) < r.num_prompt_tokens}
        # NOTE: in-flight prompt tokens still count as prefilling: their blocks are cached only
        # when the step is applied, and a sibling admitted before that would compute them again
        deferred: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # a request preempted with a token in flight is resumed only after that token arrived
            # (update_from_output runs between two schedules, and a step that preempts admits none)
            assert not req.num_pending_tokens and not req.num_in_flight_tokens, req
            if self._should_wait_for_sibling(req, prefilling_parents) or (req.structured is not None
                                                                           and not req.structured.ready):
                deferred.append(self.waiting.pop(0))  # a grammar still compiling: the next ones go first
                continue
            if req.kv_loaded:
                hits: list = []
                num_hit_tokens = req.num_computed_tokens
            else:
                hits, num_hit_tokens = self.kv.get_computed_blocks(req)
                if self.connector is not None:
                    started = self._start_external_load(req, hits, num_hit_tokens)
                    if started is None:
                        break  # no room for its blocks yet
                    if started:
                        self.waiting.pop(0)
                        continue
            num_new = req.num_tokens - num_hit_tokens
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, hits):
                break
            self.waiting.pop(0)
            req.num_computed_tokens = num_hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
            req.status = RequestStatus.RUNNING
            req.kv_loaded = False
            req.scheduled_time = req.scheduled_time or time.monotonic()
            self.running.append(req)
            scheduled[req.request_id] = num_new
            budget -= num_new
            if req.parent_id and self._computes_shared_prompt(req):
                prefilling_parents.add(req.parent_id)
        for req in reversed(deferred):
            self.waiting.insert(0, req)

    def _start_external_load(self, req: Request, hits: list[KVCacheBlock], num_hit: int) -> bool | None:
        """Ask the connector for KV past the local hit; when it loads some asynchronously, allocate
        blocks and let it start. True: the request now waits for it. False: nothing to load (admit
        as usual). None: no room for the blocks yet."""
        connector = self.connector
        assert connector is not None
        num_external, load_async = connector.get_num_new_matched_tokens(req, num_hit)
        if not num_external:
            return False
        assert load_async, "synchronous external KV is not supported yet"
        # NOTE: blocks for the whole prompt (its last token too): a loaded request then needs no
        # new block to be admitted, so loads waiting with their blocks cannot starve each other
        if not self.kv.allocate_slots(req, req.num_prompt_tokens - num_hit, hits):
            return None
        req.num_computed_tokens = num_hit
        req.num_cached_tokens = num_hit
        req.kv_load_tokens = num_hit + num_external
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        connector.update_state_after_alloc(req, self.kv.get_block_ids(req.request_id), num_external)
        return True

    def update_transfers(self) -> list[Request]:
        """Apply what the connector finished since the last step: free the blocks it hands back,
        admit loaded requests, requeue or end the ones whose load failed. Returns the requests
        that ended with an error."""
        if self.connector is None:
            return []
        failed = []
        for done in self.connector.take_finished():
            if done.free:
                self.kv.free_blocks(done.free)
            req = done.request
            if req is None:
                continue
            if done.ok:
                req.num_computed_tokens = req.kv_load_tokens
                req.kv_loaded = True
                if done.cached:
                    req.num_cached_tokens = req.kv_load_tokens
                self.kv.cache_computed_blocks(req)
            elif done.error is None:  # compute it here
                self.kv.free(req)
                req.num_computed_tokens = 0
            else:
                req.error = done.error
                self._finish(req, RequestStatus.FINISHED_ERROR)
                failed.append(req)
                continue
            req.status = RequestStatus.WAITING
            self._enqueue_waiting(req)
        return failed

    def _should_wait_for_sibling(self, req: Request, prefilling_parents: set[str]) -> bool:
        """n > 1: while one child prefills the shared prompt, its siblings wait, then hit its
        cached blocks instead of computing the same prompt again."""
        return (self.kv.enable_caching and req.parent_id in prefilling_parents
                and req.num_computed_tokens == 0 and req.num_prompt_tokens > self.kv.block_size)

    def _computes_shared_prompt(self, req: Request) -> bool:
        """True when this child computes (rather than hits) its prompt's full blocks."""
        return req.num_cached_tokens < (req.num_prompt_tokens - 1) // self.kv.block_size * self.kv.block_size

    def _num_unscheduled(self, req: Request) -> int:
        """Tokens of a running request not computed or in flight; 0 when the token in flight will
        end it by length (so no step is spent on a token that would be dropped)."""
        total = req.num_tokens + req.num_pending_tokens
        if req.num_pending_tokens and (req.num_output_tokens + req.num_pending_tokens >= req.max_tokens
                                       or total >= self.max_model_len):
            return 0
        return total - req.num_computed_tokens - req.num_in_flight_tokens

    def _make_chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens + req.num_in_flight_tokens
        drafts = self._drafts.get(req.request_id)
        if drafts:
            assert n == 1 + len(drafts) and start == req.num_tokens - 1, (req, n, drafts)
            return ScheduledChunk(req.request_id, [req.all_token_ids[start], *drafts], start,
                                  self.kv.get_block_ids(req.request_id), sample=True,
                                  num_prompt_tokens=req.num_prompt_tokens, serial=req.serial,
                                  num_draft_tokens=len(drafts),
                                  num_lookahead_tokens=self._lookahead.get(req.request_id, 0))
        known = req.all_token_ids[start:start + n]
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=known + [PLACEHOLDER_TOKEN] * (n - len(known)),
            start_pos=start,
            block_ids=self.kv.get_block_ids(req.request_id),
            sample=start + n == req.num_tokens + req.num_pending_tokens,
            num_prompt_tokens=req.num_prompt_tokens,
            serial=req.serial,
            num_lookahead_tokens=self._lookahead.get(req.request_id, 0),
        )

    # -- after the model ran -----------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: Mapping[str, int],
                           emitted: Mapping[str, list[int]] | None = None,
                           drafts: Mapping[str, tuple[int, list[int]]] | None = None) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish on stop token / length.
        emitted: for chunks with draft tokens, every token the step gives (accepted drafts, then
        the target's own). drafts: the draft model's proposals for the next step, request id ->
        (the number of tokens they follow, the drafts).

        Returns the requests that received a token (finished ones included); each request's
        ``num_step_tokens`` says how many."""
        updated = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None or req.serial != chunk.serial:
                continue  # finished (or aborted) while the step ran; perhaps its id was reused since
            req.num_step_tokens = 1
            if chunk.num_draft_tokens and req.status == RequestStatus.RUNNING:
                tokens = (emitted or {}).get(chunk.request_id) or [sampled[chunk.request_id]]
                self._apply_verified(req, chunk, tokens)
                updated.append(req)
                continue
            if req.status != RequestStatus.RUNNING:
                # preempted after this step was scheduled (asynchronous scheduling): its KV is gone,
                # but a token it sampled is part of its output
                if chunk.sample:
                    if self._take_token(req, sampled[chunk.request_id]):
                        self.waiting.remove(req)
                        self._finish(req, req.status)
                    updated.append(req)
                continue
            req.num_in_flight_tokens -= len(chunk.token_ids)
            req.num_computed_tokens += len(chunk.token_ids)
            self.kv.cache_computed_blocks(req)
            if self.connector is not None:
                self.connector.progress(req, self.kv.get_block_ids(req.request_id), req.num_computed_tokens)
            if not chunk.sample:
                continue
            if self._take_token(req, sampled[chunk.request_id]):
                self.running.remove(req)
                self._finish(req, req.status)
            elif chunk.num_lookahead_tokens:
                self.kv.trim(req, req.num_tokens)  # the drafter's scratch blocks
            updated.append(req)
        if drafts and isinstance(self.proposer, DraftModelProposals):
            self.proposer.store({rid: d for rid, d in drafts.items()
                                 if (r := self.requests.get(rid)) is not None and r.status == RequestStatus.RUNNING})
        return updated

    def _apply_verified(self, req: Request, chunk: ScheduledChunk, tokens: list[int]) -> None:
        """A chunk with drafts: append its tokens up to a stop, advance by the KV that holds (the
        last token and the accepted drafts), give back blocks only rejected drafts needed."""
        assert self.planner is not None and 1 <= len(tokens) <= len(chunk.token_ids), (chunk, tokens)
        self.planner.record(req.request_id, chunk.num_draft_tokens, len(tokens) - 1)
        steps, drafted, accepted = req.spec_counts
        req.spec_counts = (steps + 1, drafted + chunk.num_draft_tokens, accepted + len(tokens) - 1)
        req.num_in_flight_tokens -= len(chunk.token_ids)
        req.num_pending_tokens += len(tokens) - 1  # _take_token counts each one down
        taken, finished = 0, False
        for token in tokens:
            taken += 1
            if self._take_token(req, token):
                finished = True
                break
        req.num_pending_tokens -= len(tokens) - taken
        req.num_step_tokens = taken
        # each taken token but the last was an input of this step (its KV is written)
        req.num_computed_tokens += taken
        self.kv.trim(req, req.num_tokens)
        self.kv.cache_computed_blocks(req)
        if self.connector is not None:
            self.connector.progress(req, self.kv.get_block_ids(req.request_id), req.num_computed_tokens)
        if finished:
            self.running.remove(req)
            self._finish(req, req.status)

    def _take_token(self, req: Request, token: int) -> bool:
        """Append a sampled token; True (status set) when it ends the request."""
        req.num_pending_tokens -= 1
        req.append_output_token(token)
        req.first_token_time = req.first_token_time or time.monotonic()
        status = self._check_stop(req, token)
        if status is not None:
            req.status = status
        return status is not None

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens and token in params.all_stop_token_ids:
            # vLLM: stop_reason is the token for stop_token_ids, None for EOS
            req.stop_reason = token if token in (params.stop_token_ids or ()) else None
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # -- internals --------------------------------------------------------------------------------
    def _policy_key(self, req: Request) -> tuple:
        if self.config.policy == "priority":
            return (req.priority, req.arrival_time, next(self._order))
        return (req.arrival_time, next(self._order))

    def _enqueue_waiting(self, req: Request) -> None:
        key = self._order_key[req.request_id]
        keys = [self._order_key[r.request_id] for r in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, key), req)

    def _pick_victim(self) -> Request:
        """FCFS preempts the latest arrival; priority preempts the lowest priority."""
        return max(self.running, key=lambda r: self._order_key[r.request_id])

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        if self.connector is not None:  # before the free: nothing may stream these blocks now
            self.connector.progress(req, [], 0)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_in_flight_tokens = 0  # recomputed from scratch; a pending token is still applied
        req.kv_loaded = False
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(req)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if self.connector is None:
            self.kv.free(req)
        else:
            blocks = self.kv.detach(req)
            delay_free, params = self.connector.request_finished(req, blocks)
            if params is not None:
                req.kv_transfer_params = params
            if not delay_free:  # otherwise the connector hands them back through take_finished
                self.kv.free_blocks(blocks)
        del self.requests[req.request_id]
        self._order_key.pop(req.request_id, None)
        if self.proposer is not None and self.planner is not None:
            self.proposer.forget(req.request_id)
            self.planner.forget(req.request_id)
        if req.request_id in self._seen_by_runner:
            self._seen_by_runner.discard(req.request_id)
            self._finished_since_last_step.add(req.request_id)
