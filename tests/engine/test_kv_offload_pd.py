"""KV offloading on disaggregated workers (``MultiConnector``): a decode worker saves the blocks it
pulled to its host tier and serves the prompt from there when it returns without a ticket; a
prefill worker's finished prefill is both leased and saved, and its blocks are freed once."""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, EngineConfig, KVOffloadConfig, KVTransferConfig, ModelConfig, SchedulerConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request
from tests.engine.test_kv_transfer import (
    SECRET,
    decode_request,
    finished,
    greedy,
    prefill_ticket,
    prompt_of,
    run_until,
    single_output,
    tokens,
    wait_idle,
)


def _core(model_dir, role: str | None, offload: bool, num_blocks: int | None = None) -> EngineCore:
    transfer = KVTransferConfig(role=role, secret=SECRET, lease_s=5.0, transfer_timeout_s=2.0,
                                transport="tcp") if role else None
    cache = CacheConfig(block_size=16, kv_cache_memory="4MiB", num_gpu_blocks_override=num_blocks)
    return EngineCore(EngineConfig(ModelConfig(str(model_dir)), cache, SchedulerConfig(max_num_batched_tokens=256),
                                   kv_transfer=transfer,
                                   kv_offload=KVOffloadConfig(host_bytes=2**24) if offload else None))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tandem.testing import build_preset

    return build_preset("llama3-gqa", tmp_path_factory.mktemp("llama"))


def test_a_pulled_prompt_returns_from_the_decode_workers_host_tier(model_dir):
    prefill = _core(model_dir, "prefill", offload=True)
    decode = _core(model_dir, "decode", offload=True, num_blocks=24)  # about two of these prompts
    single = _core(model_dir, None, offload=False)
    try:
        prompt = prompt_of(150, seed=1)
        want = single_output(single, prompt, 6)
        decode.add_request(decode_request("d1", prompt, prefill_ticket(prefill, "p1", prompt), 6))
        assert tokens(run_until([prefill, decode], finished("d1")), "d1") == want
        for i, other in enumerate(prompt_of(150, seed=s) for s in (2, 3, 4)):  # evict it from the device
            decode.add_request(Request(f"o{i}", other, greedy(2), max_tokens=2))
            run_until([decode], finished(f"o{i}"))
        decode.settle_offload()
        decode.add_request(Request("again", prompt, greedy(6), max_tokens=6))  # no ticket: the router saw it cached
        assert tokens(run_until([decode], finished("again")), "again") == want
        assert decode.connector.offload_report().hit_tokens["CPU"] == (len(prompt) - 1) // 16 * 16
        wait_idle(prefill, decode)
    finally:
        for core in (prefill, decode):
            core.close()


def test_a_leased_and_saved_prefill_frees_its_blocks_once(model_dir):
    prefill = _core(model_dir, "prefill", offload=True)
    decode = _core(model_dir, "decode", offload=False)
    try:
        prompt = prompt_of(90, seed=5)
        params = prefill_ticket(prefill, "p", prompt)  # leased to the decode worker and saved to the host tier
        prefill.settle_offload()  # the save ends first: the lease still holds the blocks
        assert prefill.kv.pool.num_free_blocks < prefill.kv.pool.num_blocks
        decode.add_request(decode_request("d", prompt, params, 3))
        run_until([prefill, decode], finished("d"))
        wait_idle(prefill, decode)  # the release came: freed once (a double free would assert)
        assert prefill.connector.offload_report().stored_blocks == 90 // 16
    finally:
        for core in (prefill, decode):
            core.close()
