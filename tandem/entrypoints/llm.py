"""Offline API with vLLM's names: ``LLM(model=dir).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from tandem.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams

DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "tandem-demo"


def default_model_path() -> str:
    """$TANDEM_MODEL, else the demo model bundled in the repository (models/tandem-demo)."""
    env = os.environ.get("TANDEM_MODEL")
    if env:
        return env
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return str(DEMO_MODEL_DIR)
    raise ValueError(f"no model given and the bundled demo model is missing ({DEMO_MODEL_DIR}): pass a Hugging "
                     "Face model directory (config.json, *.safetensors, tokenizer.json) or set TANDEM_MODEL")


def build_engine_config(model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                        max_model_len: int | None = None, seed: int = 0, device: str = "auto", block_size: int = 16,
                        enable_prefix_caching: bool = True, kv_cache_memory: int | str | None = None,
                        gpu_memory_utilization: float = 0.9, num_gpu_blocks_override: int | None = None,
                        max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                        enable_chunked_prefill: bool = True, scheduling_policy: str = "fcfs",
                        load_format: str = "auto", enforce_eager: bool = False,
                        cuda_graph_sizes: list[int] | None = None, async_scheduling: bool = False) -> EngineConfig:
    """vLLM's engine arguments -> EngineConfig (shared by LLM and `tandem serve`)."""
    return EngineConfig(
        model=ModelConfig(model=str(model or default_model_path()), tokenizer=tokenizer, dtype=dtype,
                          max_model_len=max_model_len, seed=seed, device=device, load_format=load_format,
                          enforce_eager=enforce_eager, cuda_graph_sizes=cuda_graph_sizes),
        cache=CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching,
                          kv_cache_memory=kv_cache_memory, gpu_memory_utilization=gpu_memory_utilization,
                          num_gpu_blocks_override=num_gpu_blocks_override),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens or 2048,
                                  max_num_seqs=max_num_seqs, enable_chunked_prefill=enable_chunked_prefill,
                                  policy=scheduling_policy, async_scheduling=async_scheduling),
    )


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, device: str = "auto",
                 block_size: int = 16, enable_prefix_caching: bool = True,
                 kv_cache_memory: int | str | None = None, gpu_memory_utilization: float = 0.9,
                 num_gpu_blocks_override: int | None = None,
                 max_num_batched_tokens: int | None = None, max_num_seqs: int = 256,
                 enable_chunked_prefill: bool = True, scheduling_policy: str = "fcfs",
                 attention_backend: str = "auto", load_format: str = "auto", enforce_eager: bool = False,
                 cuda_graph_sizes: list[int] | None = None, async_scheduling: bool = False) -> None:
        config = build_engine_config(model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                     device=device, block_size=block_size,
                                     enable_prefix_caching=enable_prefix_caching, kv_cache_memory=kv_cache_memory,
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     num_gpu_blocks_override=num_gpu_blocks_override,
                                     max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                     enable_chunked_prefill=enable_chunked_prefill,
                                     scheduling_policy=scheduling_policy, load_format=load_format,
                                     enforce_eager=enforce_eager, cuda_graph_sizes=cuda_graph_sizes,
                                     async_scheduling=async_scheduling)
        self.llm_engine = LLMEngine(config, attention_backend)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, use_tqdm: bool = True, priority: list[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of ``prompts``."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = self._broadcast(sampling_params, len(prompts))
        engine = self.llm_engine
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                ids.append(engine.add_request(None, prompt, p, priority=priority[i] if priority else 0))
        except Exception:
            engine.abort_request(ids)  # all-or-nothing: a bad prompt leaves nothing queued
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                                                     tokenize=True, return_dict=False))}
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    @staticmethod
    def _broadcast(params, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
        return params

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests() and len(finished) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]
