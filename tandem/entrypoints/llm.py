"""Offline API with vLLM's names: ``LLM(model=dir).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, cast

from tqdm import tqdm

from tandem.config import EngineConfig
from tandem.engine.arg_utils import EngineArgs
from tandem.engine.llm_engine import LLMEngine, PromptType
from tandem.outputs import RequestOutput
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import template_messages


def build_engine_config(model: str | None = None, **kwargs: Any) -> EngineConfig:
    """``EngineArgs(model, **kwargs).create_engine_config()`` (kept for callers of the old helper)."""
    return EngineArgs.from_kwargs("build_engine_config", model=model, **kwargs).create_engine_config()


class LLM:
    """Offline engine. Keyword arguments are the fields of ``EngineArgs`` (tandem/engine/arg_utils.py),
    e.g. ``LLM(model=dir, max_num_seqs=64, kv_cache_memory="1GiB")``; an unknown one is a TypeError."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs("LLM", model=model, **kwargs)
        self.llm_engine = LLMEngine(self.engine_args.create_engine_config())

    # inspect.signature(LLM) and help(LLM) show the engine arguments, read from EngineArgs
    __init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *EngineArgs.signature_parameters()],
        return_annotation=None)

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
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Messages in OpenAI's form, as the server takes them (content parts, assistant tool_calls,
        tool messages); ``tools``: function definitions in OpenAI's form, handed to the chat template."""
        conversations = cast(list[list[dict]], [messages] if messages and isinstance(messages[0], dict) else messages)
        tok = self.get_tokenizer()
        prompts = [{"prompt_token_ids": list(tok.apply_chat_template(
            template_messages(conv), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False,
            tools=tools))} for conv in conversations]
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
