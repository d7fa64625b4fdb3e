"""KV offloading (tandem/kv_offload): blocks evicted from a small device pool come back from the
host tier, or from the disk tier after a restart, with the outputs of recomputation; corrupt and
foreign files are never loaded; every tier returns to idle after aborts (``make_llm`` checks)."""

from __future__ import annotations

import json
import logging
import shutil
from typing import NamedTuple

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.kv_events import BlockRemoved, BlockStored
from tandem.kv_offload import disk
from tandem.kv_offload.stats import OffloadStats
from tests.helpers import prompts_for

GREEDY = SamplingParams(temperature=0, max_tokens=6)
BLOCK = 16
# a device pool of 24 blocks holds about two of these prompts: visiting all four evicts the first
LENGTHS = [150, 170, 140, 160]
SMALL_POOL = {"num_gpu_blocks_override": 24, "block_size": BLOCK}


def _prompts(model_dir, seed: int = 3) -> list[list[int]]:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return prompts_for(vocab, lengths=LENGTHS, seed=seed)


def _visit(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    """One prompt at a time, as a user revisiting conversations would."""
    return [list(llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids)
            for p in prompts]


def _report(llm: LLM) -> OffloadStats:
    core = llm.llm_engine.core
    core.settle_offload()
    report = core.connector.offload_report()
    assert report is not None
    return report


def _loadable_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens a cache can supply: whole blocks, the last prompt token always computed."""
    return sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)


class Reference(NamedTuple):
    prompts: list[list[int]]
    want: list[list[int]]  # outputs with every prompt computed
    bytes_per_block: int


@pytest.fixture
def reference(make_llm, model_dirs):
    prompts = _prompts(model_dirs["llama3-gqa"])
    llm = make_llm(block_size=BLOCK)
    return Reference(prompts, _visit(llm, prompts), llm.llm_engine.core.runner.kv_bytes_per_block)


def test_revisited_prefixes_come_back_from_the_host_tier(make_llm, reference):
    prompts, want, _ = reference
    llm = make_llm(kv_offloading_size=0.01, **SMALL_POOL)
    assert _visit(llm, prompts) == want
    device_hits = llm.llm_engine.core.kv.stats.hits
    assert _visit(llm, prompts) == want
    report = _report(llm)
    from_tiers = report.hit_tokens.get("CPU", 0)
    from_device = llm.llm_engine.core.kv.stats.hits - device_hits
    assert from_tiers + from_device >= 0.9 * _loadable_tokens(prompts)
    assert from_tiers >= 0.5 * _loadable_tokens(prompts), "the device pool cannot have kept most of them"
    events = llm.llm_engine.take_kv_events()
    stored = {h for e in events if isinstance(e, BlockStored) and e.medium == "CPU" for h in e.block_hashes}
    removed = {h for e in events if isinstance(e, BlockRemoved) and e.medium is None for h in e.block_hashes}
    assert len(stored) == report.stored_blocks, "each block is saved once"
    assert stored & removed, "blocks evicted from the device stay announced in the CPU tier"


def test_nothing_is_saved_twice_and_a_small_host_tier_evicts_lru(make_llm, reference):
    prompts, want, _ = reference
    llm = make_llm(kv_offloading_size=10 * reference.bytes_per_block / 2**30, **SMALL_POOL)  # 10 blocks
    for _ in range(2):
        assert _visit(llm, prompts) == want
    report = _report(llm)
    assert report.host_blocks_used <= report.host_blocks_total
    events = llm.llm_engine.take_kv_events()
    assert any(isinstance(e, BlockRemoved) and e.medium == "CPU" for e in events)


@pytest.mark.parametrize("variant", ["chunked", "preempting", "async"])
def test_concurrent_requests_with_offloading_keep_their_outputs(variant, make_llm, model_dirs):
    prompts = _prompts(model_dirs["llama3-gqa"], seed=5)
    params = SamplingParams(temperature=0, max_tokens=24)
    want = [list(o.outputs[0].token_ids) for o in make_llm().generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    extra = {"chunked": {"max_num_batched_tokens": 48}, "preempting": {"num_gpu_blocks_override": 30},
             "async": {"async_scheduling": True, "max_num_batched_tokens": 64}}[variant]
    llm = make_llm(kv_offloading_size=0.01, **{**SMALL_POOL, **extra})
    for _ in range(2):  # the second round loads what the first saved, while others run
        got = [list(o.outputs[0].token_ids) for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts + prompts[:2]], params, use_tqdm=False)]
        assert got == want + want[:2]
    assert _report(llm).hit_tokens.get("CPU", 0) > 0
    if variant == "preempting":
        assert llm.llm_engine.core.scheduler.num_preemptions > 0


def test_a_request_aborted_while_its_blocks_load_leaks_nothing(make_llm, reference):
    prompts, want, _ = reference
    llm = make_llm(kv_offloading_size=0.01, **SMALL_POOL)
    _visit(llm, prompts)  # prompts[0] is now on the host tier only
    engine = llm.llm_engine
    engine.add_request("victim", {"prompt_token_ids": prompts[0]}, GREEDY)
    engine.step()
    assert "victim" in engine.core.scheduler.loading
    engine.abort_request("victim")
    assert _visit(llm, prompts[:1]) == want[:1]  # the host tier still serves it
    assert _report(llm).hit_tokens["CPU"] == (len(prompts[0]) - 1) // BLOCK * BLOCK  # the aborted load counts not


def test_the_disk_tier_answers_a_restarted_engine(make_llm, reference, tmp_path):
    prompts, want, _ = reference
    first = make_llm(kv_offloading_size=0.01, kv_disk_path=str(tmp_path), kv_disk_size=0.01, **SMALL_POOL)
    assert _visit(first, prompts) == want
    written = _report(first).disk_written_blocks
    assert written >= _loadable_tokens(prompts) // BLOCK - len(prompts)
    first.llm_engine.core.close()

    restarted = make_llm(kv_offloading_size=0.01, kv_disk_path=str(tmp_path), kv_disk_size=0.01, **SMALL_POOL)
    announced = [e for e in restarted.llm_engine.take_kv_events() if isinstance(e, BlockStored)]
    assert {e.medium for e in announced} == {"DISK"} and len(announced) == written
    assert _visit(restarted, prompts) == want
    assert _report(restarted).hit_tokens.get("DISK", 0) >= 0.9 * _loadable_tokens(prompts)


def test_corrupt_and_foreign_disk_files_are_never_loaded(make_llm, reference, tmp_path, caplog):
    prompts, want, _ = reference
    first = make_llm(kv_offloading_size=0.01, kv_disk_path=str(tmp_path), kv_disk_size=0.01, **SMALL_POOL)
    _visit(first, prompts[:1])
    _report(first)
    first.llm_engine.core.close()
    files = sorted(tmp_path.glob(f"*{disk.SUFFIX}"))
    assert files
    # a flipped payload byte: the header still names this model, the checksum does not match
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    # a file of another model under a name of its own
    foreign = tmp_path / f"{'ab' * 32}{disk.SUFFIX}"
    shutil.copy(files[-1], foreign)
    raw = foreign.read_bytes()
    compat_at = raw.index(b"compat") + len(b"compat") + 2  # msgpack str8 header, then the hex digest
    foreign.write_bytes(raw[:compat_at] + b"f" * 32 + raw[compat_at + 32:])

    with caplog.at_level(logging.WARNING, logger="tandem.kv_offload"):
        restarted = make_llm(kv_offloading_size=0.01, kv_disk_path=str(tmp_path), kv_disk_size=0.01, **SMALL_POOL)
        assert _visit(restarted, prompts[:1]) == want[:1]
    report = _report(restarted)
    assert report.corrupt_files == 2 and report.loads_failed == 1
    assert "another model" in caplog.text and "checksum mismatch" in caplog.text
    assert victim.read_bytes() != bytes(data), "the corrupt file was deleted, then saved again when recomputed"
    assert foreign.exists(), "another model's file is left alone"
    assert _visit(restarted, prompts[:1]) == want[:1]  # computed again, then saved again


def test_offloading_is_refused_where_it_cannot_work(model_dirs, tmp_path):
    model = str(model_dirs["llama3-gqa"])
    with pytest.raises(ValueError, match="needs enable_prefix_caching"):
        LLM(model=model, kv_offloading_size=0.01, enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_disk_path needs kv_offloading_size"):
        LLM(model=model, kv_disk_path=str(tmp_path))
    with pytest.raises(ValueError, match="kv_offloading_backend"):
        LLM(model=model, kv_offloading_size=0.01, kv_offloading_backend="lmcache")


def test_aborts_at_every_stage_leave_every_tier_idle(make_llm, reference, tmp_path):
    """Abort while waiting, mid-prefill (chunked), mid-decode and while loading from the host tier
    and from disk; afterwards the pool, the tiers and their pins are idle (make_llm checks) and
    the tiers still serve."""
    prompts, want, _ = reference
    llm = make_llm(kv_offloading_size=0.01, kv_disk_path=str(tmp_path), kv_disk_size=0.01,
                   max_num_batched_tokens=32, max_num_seqs=2, **SMALL_POOL)
    _visit(llm, prompts)  # every prompt saved; the early ones only on the host tier and disk now
    engine = llm.llm_engine
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("loading", {"prompt_token_ids": prompts[0]}, GREEDY)
    engine.add_request("decoding", {"prompt_token_ids": prompts[1][:40]}, long)
    engine.add_request("waiting", {"prompt_token_ids": prompts[2][:50]}, GREEDY)  # max_num_seqs 2
    engine.step()
    assert "loading" in engine.core.scheduler.loading
    engine.abort_request(["loading", "waiting"])
    for _ in range(4):  # prefill in chunks of 32 tokens, then decode
        engine.step()
    engine.add_request("prefilling", {"prompt_token_ids": prompts[3]}, GREEDY)
    engine.step()
    engine.abort_request(["decoding", "prefilling"])
    assert _visit(llm, prompts[:1]) == want[:1]


def test_a_load_that_fails_computes_the_prompt_once_and_never_retries(make_llm, reference, monkeypatch):
    prompts, want, _ = reference
    llm = make_llm(kv_offloading_size=0.01, **SMALL_POOL)
    _visit(llm, prompts)  # prompts[0] is now on the host tier only
    worker = llm.llm_engine.core.connector.worker

    def broken(block_ids, staging):
        raise RuntimeError("device copy failed")

    monkeypatch.setattr(worker, "_staging_to_device", broken)
    assert _visit(llm, prompts[:1]) == want[:1]
    assert _report(llm).loads_failed == 1, "one failed load, then the prompt is computed, not loaded again"
