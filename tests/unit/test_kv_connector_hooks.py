"""The scheduler drives a KV connector through its hooks only (tandem/kv_transfer/base.py): a fake
connector that claims external tokens for some requests, loads them "asynchronously" (until the
test says they finished), and may keep a finished request's blocks."""

import pytest

from tandem.config import SchedulerConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus
from tandem.engine.scheduler import Scheduler
from tandem.kv_transfer.base import FinishedTransfer, KVConnectorBase, load_key
from tandem.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 32


class FakeConnector(KVConnectorBase):
    """Claims ``external`` tokens past the local hit for requests whose id starts with "ext"."""

    def __init__(self, external: int, keep_finished: bool = False) -> None:
        self.external = external
        self.keep_finished = keep_finished  # request_finished keeps every finished request's blocks
        self.calls: list[tuple] = []
        self._loading: dict[str, Request] = {}
        self.parked: dict[str, list] = {}  # load_key or request id -> blocks kept
        self.finished: list[FinishedTransfer] = []
        self.ended: list[str] = []  # request ids, in the order request_finished saw them

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.calls.append(("matched", request.request_id, num_computed_tokens))
        if not request.request_id.startswith("ext") or request.kv_loaded:
            return 0, False
        return max(0, min(self.external, request.num_prompt_tokens - 1) - num_computed_tokens), True

    def update_state_after_alloc(self, request, block_ids, num_external_tokens):
        self.calls.append(("alloc", request.request_id, list(block_ids), num_external_tokens))
        assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
        self._loading[request.request_id] = request

    def build_connector_meta(self, scheduler_output):
        self.calls.append(("meta", len(scheduler_output.chunks)))
        return {"step": sum(c[0] == "meta" for c in self.calls)}

    def progress(self, request, block_ids, num_computed_tokens):
        self.calls.append(("progress", request.request_id, num_computed_tokens))

    def request_finished(self, request, blocks):
        self.ended.append(request.request_id)
        if self._loading.pop(request.request_id, None) is not None:  # aborted mid-load: park
            self.parked[load_key(request)] = blocks
            return True, None
        if self.keep_finished:
            self.parked[request.request_id] = blocks
            return True, {"kept": len(blocks)}
        return False, None

    def take_finished(self):
        done, self.finished = self.finished, []
        return done

    def has_pending(self):
        return bool(self._loading or self.parked)

    @property
    def loading(self):
        return self._loading

    # -- what the test plays: the transfer's side ------------------------------------------------
    def load_done(self, rid: str, ok: bool = True, error: str | None = None) -> None:
        req = self._loading.pop(rid)
        self.finished.append(FinishedTransfer(request=req, ok=ok, error=error))

    def result_of_aborted(self, key: str) -> None:
        self.finished.append(FinishedTransfer(free=self.parked.pop(key)))


def make(connector, budget=64, num_blocks=NUM_BLOCKS):
    kv = KVCacheManager(num_blocks, BLOCK, True)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8), kv, max_model_len=256,
                     connector=connector)


def req(rid, n_prompt, max_tokens=3, first=100):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(rid, list(range(first, first + n_prompt)), params, max_tokens=max_tokens)


def step(s: Scheduler, token=7):
    failed = s.update_transfers()
    out = s.schedule()
    s.update_from_output(out, {c.request_id: token for c in out.chunks if c.sample})
    s.kv.pool.check_invariants()
    return out, failed


def free(s: Scheduler) -> int:
    return s.kv.pool.num_free_blocks


def test_async_load_then_admitted_like_a_prefix_hit():
    c = FakeConnector(external=16)
    s = make(c)
    r = req("ext-1", 18)
    s.add_request(r)
    out, _ = step(s)
    assert not out.chunks and out.kv_connector_metadata == {"step": 1}
    assert ("matched", "ext-1", 0) in c.calls
    alloc = [x for x in c.calls if x[0] == "alloc"]
    assert len(alloc) == 1 and alloc[0][3] == 16 and len(alloc[0][2]) == 5  # blocks for the whole prompt
    assert r.status == RequestStatus.WAITING_FOR_REMOTE_KVS and "ext-1" in s.loading
    assert s.has_pending_transfers() and not s.has_runnable_requests()
    assert free(s) == NUM_BLOCKS - 5
    for _ in range(3):  # still loading: nothing to do, nothing asked again
        out, _ = step(s)
        assert not out.chunks
    assert len([x for x in c.calls if x[0] == "alloc"]) == 1
    c.load_done("ext-1")
    out, _ = step(s)
    assert [(ch.start_pos, len(ch.token_ids)) for ch in out.chunks] == [(16, 2)]  # only the rest
    assert free(s) == NUM_BLOCKS - 5  # admitted without a new block
    while s.has_unfinished_requests():
        step(s)
    assert r.output_token_ids == [7, 7, 7] and r.status == RequestStatus.FINISHED_LENGTH
    assert c.ended == ["ext-1"]
    assert ("progress", "ext-1", 18) in c.calls
    assert not s.has_pending_transfers()
    s.kv.pool.assert_idle()


def test_plain_requests_pass_through_the_hooks():
    c = FakeConnector(external=16)
    s = make(c)
    s.add_request(req("plain", 10))
    while s.has_unfinished_requests():
        step(s)
    assert c.ended == ["plain"] and not [x for x in c.calls if x[0] == "alloc"]
    s.kv.pool.assert_idle()


def test_aborted_load_parks_its_blocks_until_its_result():
    c = FakeConnector(external=16)
    s = make(c)
    r = req("ext-a", 18)
    s.add_request(r)
    step(s)
    assert free(s) == NUM_BLOCKS - 5
    assert s.finish_requests(["ext-a"], RequestStatus.FINISHED_ABORTED) == [r]
    assert s.finish_requests(["ext-a"], RequestStatus.FINISHED_ABORTED) == []  # ends once
    assert c.ended == ["ext-a"] and not s.has_unfinished_requests()
    assert free(s) == NUM_BLOCKS - 5 and s.has_pending_transfers()  # the load may still write
    step(s)
    assert free(s) == NUM_BLOCKS - 5
    c.result_of_aborted(load_key(r))
    step(s)
    assert free(s) == NUM_BLOCKS and not s.has_pending_transfers()
    s.kv.pool.assert_idle()


def test_reused_request_id_gets_its_own_load():
    c = FakeConnector(external=8)
    s = make(c)
    first = req("ext-r", 12)
    s.add_request(first)
    step(s)
    s.finish_requests(["ext-r"], RequestStatus.FINISHED_ABORTED)
    second = req("ext-r", 12)
    s.add_request(second)
    step(s)
    assert load_key(first) != load_key(second) and set(c.parked) == {load_key(first)}
    c.result_of_aborted(load_key(first))
    c.load_done("ext-r")
    while s.has_unfinished_requests():
        step(s)
    assert second.status == RequestStatus.FINISHED_LENGTH and c.ended == ["ext-r", "ext-r"]
    s.kv.pool.assert_idle()


def test_failed_load_ends_with_error_and_frees_its_blocks():
    c = FakeConnector(external=16)
    s = make(c)
    r = req("ext-f", 18)
    s.add_request(r)
    step(s)
    c.load_done("ext-f", ok=False, error="kv transfer failed (timeout): no progress")
    _, failed = step(s)
    assert failed == [r] and r.status == RequestStatus.FINISHED_ERROR and r.error.endswith("no progress")
    assert c.ended == ["ext-f"] and not s.has_unfinished_requests()
    s.kv.pool.assert_idle()


def test_failed_load_without_error_is_computed_here():
    c = FakeConnector(external=16)
    s = make(c)
    r = req("ext-c", 18)
    s.add_request(r)
    step(s)
    c.load_done("ext-c", ok=False)
    c.external = 0  # the connector has nothing for it now
    out, failed = step(s)
    assert not failed and [(ch.start_pos, len(ch.token_ids)) for ch in out.chunks] == [(0, 18)]
    while s.has_unfinished_requests():
        step(s)
    assert r.status == RequestStatus.FINISHED_LENGTH and c.ended == ["ext-c"]
    s.kv.pool.assert_idle()


def test_preemption_retracts_progress_before_the_free():
    c = FakeConnector(external=0)
    s = make(c, num_blocks=6)
    for i in range(2):
        s.add_request(req(f"p{i}", 8, max_tokens=10, first=10 * i))
    while s.has_unfinished_requests():
        step(s)
    assert s.num_preemptions >= 1 and ("progress", "p1", 0) in c.calls
    assert sorted(c.ended) == ["p0", "p1"]
    s.kv.pool.assert_idle()


def test_request_finished_may_keep_the_blocks():
    c = FakeConnector(external=0, keep_finished=True)
    s = make(c)
    r = req("keep", 9, max_tokens=1)
    s.add_request(r)
    while s.has_unfinished_requests():
        step(s)
    assert r.kv_transfer_params == {"kept": 3}
    assert free(s) == NUM_BLOCKS - 3 and s.has_pending_transfers()
    c.finished.append(FinishedTransfer(free=c.parked.pop("keep")))
    step(s)
    s.kv.pool.assert_idle()


def test_without_a_connector_nothing_runs():
    s = make(None)
    assert s.loading == {} and not s.has_pending_transfers() and s.update_transfers() == []
    with pytest.raises(ValueError, match="does not prefill for others"):
        s.add_request(Request("x", [1, 2, 3], SamplingParams(max_tokens=1), max_tokens=1, do_remote_decode="l" * 32))
    s.add_request(req("y", 6))
    out, _ = step(s)
    assert out.kv_connector_metadata is None
