"""tandem: LLM serving with a paged KV cache, continuous batching, chunked prefill and prefix caching."""

from tandem.entrypoints.llm import LLM
from tandem.outputs import CompletionOutput, Logprob, RequestOutput
from tandem.sampling_params import SamplingParams, StructuredOutputsParams
from tandem.version import __version__

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
