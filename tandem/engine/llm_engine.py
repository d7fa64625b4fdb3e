"""LLMEngine: InputProcessor -> EngineCore (scheduler, runner) -> OutputProcessor, in one process.

One ``step()`` is one EngineCore step (one model forward over a mixed batch of decodes and prefill
chunks) followed by output processing: n > 1 aggregation, logprob decoding, incremental
detokenization. Stop strings are found there and end the request in the core before its next step.
The API process's ``AsyncLLM`` is the same two processors over an EngineCore behind ZMQ; both
send the core the same ``EngineCoreRequest`` structs and read the same ``EngineCoreOutput``s.
NOTE: every accepted request ends exactly once (finished, aborted or failed); its blocks are free
from that moment.
"""

from __future__ import annotations

import logging

from tandem.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.input_processor import InputProcessor, PromptType
from tandem.engine.output_processor import OutputProcessor
from tandem.outputs import RequestOutput
from tandem.profiling import span
from tandem.sampling_params import SamplingParams
from tandem.tokenizer import eos_token_ids, load_tokenizer

__all__ = ["LLMEngine", "PromptType", "make_processors", "add_request"]

logger = logging.getLogger(__name__)


def make_processors(core, model_dir: str, tokenizer_dir: str | None, hf_config: dict, vocab_size: int,
                    max_model_len: int) -> tuple[InputProcessor, OutputProcessor]:
    """The text side of an engine over ``core`` (an EngineCore here, or a client of one)."""
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    inputs = InputProcessor(tokenizer, eos_token_ids(model_dir, tokenizer, hf_config), vocab_size, max_model_len)
    return inputs, OutputProcessor(core, tokenizer)


def add_request(inputs: InputProcessor, outputs: OutputProcessor, request_id: str | None, prompt: PromptType,
                params: SamplingParams | None = None, **kwargs) -> str:
    """Tokenize and validate (InputProcessor), then track and send to the core (OutputProcessor).
    ``kwargs``: priority, cache_salt, arrival_time, remote_ticket, do_remote_decode."""
    request_id = request_id if request_id is not None else inputs.new_request_id()
    outputs.check_new(request_id)  # before tokenizing: a duplicate id is refused first
    outputs.submit(inputs.process(request_id, prompt, params, **kwargs))
    return request_id


class LLMEngine:
    """Offline engine: an InputProcessor and an OutputProcessor over an EngineCore in the same
    process; one step() at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = core = EngineCore(config)
        self.input_processor, self.output_processor = make_processors(
            core, config.model.model, config.model.tokenizer, core.hf_config, core.vocab_size, core.max_model_len)
        self.tokenizer = self.input_processor.tokenizer
        self.hf_config, self.vocab_size, self.max_model_len = core.hf_config, core.vocab_size, core.max_model_len
        # the core's parts, for introspection and tests
        self.runner, self.kv, self.scheduler = core.runner, core.kv, core.scheduler

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    *, priority: int = 0, cache_salt: str | None = None, arrival_time: float | None = None,
                    remote_ticket=None, do_remote_decode: bool | str = False) -> str:
        return add_request(self.input_processor, self.output_processor, request_id, prompt, params,
                           priority=priority, cache_salt=cache_salt, arrival_time=arrival_time,
                           remote_ticket=remote_ticket, do_remote_decode=do_remote_decode)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        return self.output_processor.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    @property
    def num_requests(self) -> int:
        return self.output_processor.num_requests

    def step(self) -> list[RequestOutput]:
        outputs = self.core.step()
        with span("outputs"):  # detokenize, stop strings, RequestOutputs
            return self.output_processor.process_outputs(outputs)

    def take_kv_events(self):
        return self.core.take_kv_events()

    def assert_idle(self) -> None:
        """No request in flight: every block free, every reference count 0."""
        assert not self.output_processor.has_unfinished_requests(), "engine still tracks requests"
        self.core.assert_idle()
