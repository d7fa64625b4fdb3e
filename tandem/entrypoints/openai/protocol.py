"""OpenAI request bodies (pydantic), with OpenAI's limits, and their mapping to SamplingParams."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tandem.entrypoints.openai.tool_calls import required_schema
from tandem.sampling_params import ParamError, SamplingParams, StructuredOutputsParams

MAX_TOKENS_CAP = 2**31 - 1
INT32_MAX = 2**31 - 1  # bound of every integer sampling field: the engine keeps them in int32/int64 tensors
MAX_PROMPTS = 256  # prompts in one completion request
MAX_SEQUENCES = 512  # n x prompts in one request: the sequences one request may put in flight
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")


class OpenAIError(Exception):
    """Raised by handlers; rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    """A nested request object: a key it does not declare is a 400, never ignored."""
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries usage so far


# A field tandem does not implement may still be sent with the value that asks for nothing: these
# values pass; any other value of an unknown field is a 400 that names it (never silently ignored).
_NO_OP_VALUES: dict[str, Callable[[Any, dict], bool]] = {
    "best_of": lambda v, body: v in (1, body.get("n", 1)),
    "suffix": lambda v, body: v == "",
    "tools": lambda v, body: v == [],
    "tool_choice": lambda v, body: v == "none",
    "parallel_tool_calls": lambda v, body: not body.get("tools"),
    "functions": lambda v, body: v == [],
    "function_call": lambda v, body: v == "none",
    "use_beam_search": lambda v, body: v is False,
}


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(populate_by_name=True)  # merged with _Strict's

    name: str = Field("response", max_length=256)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output always follows the schema here, strict or not


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsBody(_Strict):
    """vLLM's ``structured_outputs`` request field."""
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _reject_unencodable(value: Any, depth: int = 0) -> None:
    """Raise ValueError if any string in a parsed JSON body is not valid Unicode text (a lone
    surrogate such as "\\ud800" parses, but no tokenizer or encoder can take it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("strings must be valid Unicode (a lone surrogate is not)") from None
    elif depth < 64 and isinstance(value, dict):
        for k, v in value.items():
            _reject_unencodable(k, depth + 1)
            _reject_unencodable(v, depth + 1)
    elif depth < 64 and isinstance(value, list):
        for v in value:
            if type(v) is not int:  # token ids, most of a big body, have no text: no call per id
                _reject_unencodable(v, depth + 1)


class _Body(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _reject_unencodable(data)
        return data


class _SamplingFields(_Body):
    # only null or no-op values of unknown fields get past _refuse_unsupported; the schema says so
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                if key in cls.model_fields or value is None:
                    continue
                check = _NO_OP_VALUES.get(key)
                if check is None or not check(value, data):
                    raise OpenAIError(400, f"{key!r} is not supported by this server; leave it out"
                                      + (" or send its default" if check else ""), param=key,
                                      code="unsupported_parameter")
        return data

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS_CAP)
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT32_MAX)]] | None = Field(None, max_length=1024)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: logprobs of every prompt position
    # structured outputs, in OpenAI's form, vLLM's, and vLLM's older guided_* fields (one of them)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_field(self) -> str | None:
        """The field the client constrained the output with, if any."""
        for name in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, ResponseFormat) and value.type == "text"):
                return name
        return None

    def structured(self) -> tuple[str, StructuredOutputsParams] | None:
        """(the field the client used, its constraint); None: unconstrained. Raises ParamError."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ParamError("response_format", "response_format json_schema needs json_schema.schema")
            given.append(("response_format", {"json": rf.json_schema.json_schema}))
        if self.structured_outputs is not None:
            given.append(("structured_outputs", self.structured_outputs.model_dump(by_alias=True, exclude_none=True)))
        for name, key in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                          ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                given.append((name, {key: getattr(self, name)}))
        if len(given) > 1:
            raise ParamError(given[1][0], f"give one structured output constraint, not {[g[0] for g in given]}")
        if not given:
            return None
        field, spec = given[0]
        try:
            return field, StructuredOutputsParams(**spec)
        except ParamError as e:
            raise ParamError(field, str(e)) from None
    priority: int = Field(0, ge=-INT32_MAX, le=INT32_MAX)
    # Disaggregated serving (vLLM's field): {"do_remote_decode": true} on a prefill worker returns a
    # ticket in the response's kv_transfer_params; that ticket on a decode worker loads the prompt's KV.
    kv_transfer_params: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not _TOKEN_ID_KEY.fullmatch(key) or int(key) > INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids (decimal digits), got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def wanted_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        structured = self.structured()
        return SamplingParams(
            structured_outputs=structured[1] if structured else None,
            prompt_logprobs=self.wanted_prompt_logprobs(),
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            seed=None if self.seed is None else self.seed % 2**63, stop=self.stop,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            stop_token_ids=self.stop_token_ids,
        )

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage
                    and self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_CAP)  # 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str) or v and isinstance(v[0], int):
            return v
        if not v:
            raise ValueError("prompt must not be empty")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        return v

    @model_validator(mode="after")
    def _echo_rules(self):
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens 0 needs echo (the prompt and its logprobs are the answer)",
                              param="max_tokens")
        if self.stream and self.prompt_logprobs is not None:
            raise OpenAIError(400, "prompt_logprobs does not stream; use echo with logprobs", param="prompt_logprobs")
        return self

    def wanted_prompt_logprobs(self) -> int | None:
        """echo with logprobs scores the prompt too (as vLLM, for lm-eval's loglikelihood requests)."""
        asked = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(asked) if asked else None

    @model_validator(mode="after")
    def _bounded_fan_out(self):
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_SEQUENCES:
            raise ValueError(f"n x prompts = {prompts * self.n} sequences; at most {MAX_SEQUENCES} in one request")
        return self

    def prompts(self) -> list[str | dict[str, Any]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [{"prompt_token_ids": [x for x in p if isinstance(x, int)]}]
        return [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in p if not isinstance(x, int)]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None  # constrained choices always follow the schema, strict or not


class ChatTool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # keys a client may echo back from a response (refusal, audio, ...) pass when null; others are 400
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=128)  # an assistant's earlier calls
    tool_call_id: str | None = Field(None, max_length=256)  # a tool message: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_keys(cls, data: Any) -> Any:
        for key, value in data.items() if isinstance(data, dict) else ():
            if key not in cls.model_fields and value is not None:
                raise ValueError(f"message field {str(key)[:40]!r} is not supported; leave it out")
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v):
        for part in v if isinstance(v, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" and isinstance(kind, str):  # e.g. image_url: refused, never silently dropped
                raise ValueError(f"content parts of type {kind[:40]!r} are not supported; only 'text'")
        return v

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = Field(None, max_length=128)
    # default: "auto" with tools, "none" without (as OpenAI)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self):
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise OpenAIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names():
            raise OpenAIError(400, f"tool_choice names {choice.function.name!r}, which is not in tools",
                              param="tool_choice")
        other = _SamplingFields.structured_field(self)
        if self.constrains_tool_calls() and other is not None:
            raise OpenAIError(400, f"tool_choice {self.effective_tool_choice()!r} constrains the output to tool "
                                   f"calls; it does not combine with {other}", param="tool_choice")
        return self

    def structured_field(self) -> str | None:
        return "tool_choice" if self.constrains_tool_calls() else super().structured_field()

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or []]

    def effective_tool_choice(self) -> str:
        """"none", "auto", "required" or the named function's name."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or ("auto" if self.tools else "none")

    def constrains_tool_calls(self) -> bool:
        """tool_choice required or a named function: the output is tool calls, by grammar."""
        return isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required"

    def structured(self) -> tuple[str, StructuredOutputsParams] | None:
        if not self.constrains_tool_calls():
            return super().structured()
        choice = self.tool_choice
        tools = [t.function.model_dump(exclude_none=True) for t in self.tools or []]
        if isinstance(choice, NamedToolChoice):
            schema = next(t.get("parameters") for t in tools if t["name"] == choice.function.name)
            spec = StructuredOutputsParams(json=schema or {"type": "object"})
        else:
            spec = StructuredOutputsParams(json=required_schema(tools, self.parallel_tool_calls))
        return "tool_choice", spec

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.stream and self.prompt_logprobs is not None:
            raise OpenAIError(400, "prompt_logprobs does not stream", param="prompt_logprobs")
        return self


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = Field(None, max_length=128)  # rendered by the chat template, with messages
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
