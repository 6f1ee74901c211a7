"""Request and response bodies: OpenAI's schemas, plus HOPE's extensions.

Extensions (all optional, ignored by OpenAI clients): requests take `session_id`, `learn`,
`top_k` and `ignore_eos`; `stream_options.include_surprise` adds each token's loss to the
stream; responses carry a `session` object (id, version, tokens absorbed, messages recognised as
re-sent, whether it learned).

OpenAI parameters that would change the output and are not implemented (the penalties,
`logit_bias`, `tools` and `functions`, a `response_format` other than text, completions'
`suffix` and `best_of`) are refused with a 400 unless they hold their neutral value, which
clients often send; silently ignoring them would answer a different request than the one made.
So are vLLM's and llama.cpp's extensions of that kind, which clients moved from those servers
send (`repetition_penalty`, `min_p`, `min_tokens`, `guided_*`, `grammar`, ...).
Other unknown parameters (`metadata`, `store`, ...) are accepted and ignored. A null parameter
is its default, as at OpenAI.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SkipValidation,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from hope_core.sampling import MAX_TOP_LOGPROBS
from server.stores.base import SESSION_ID_RE

SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_RE.pattern)]

# OpenAI allows 4, vLLM any number; lm-evaluation-harness sends a task's stop strings plus the
# end-of-text name (five for gsm8k's chain of thought and humaneval)
MAX_STOP_SEQUENCES = 16
MAX_LEGACY_LOGPROBS = 5  # completions' `logprobs`, as at OpenAI


def _only_one_choice(n: int) -> int:
    if n != 1:
        raise ValueError("only n=1 is supported (a session is one stream)")
    return n


def _neutral(value: Any, neutral: bool, message: str) -> Any:
    if not neutral:
        raise ValueError(message)
    return value


def _stop_list(v: str | list[str] | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    return [s for s in stops if s]


# ---- requests --------------------------------------------------------------------------------

class OpenAIRequest(BaseModel):
    """A request body, or a part of one. OpenAI's clients send unset parameters as null, which
    OpenAI reads as the default (completions' max_tokens: null is 16, as when left out)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(OpenAIRequest):
    include_usage: bool = False
    include_surprise: bool = False  # HOPE: each chunk carries the loss (-logprob) of its tokens


class SamplingFields(OpenAIRequest):
    """Parameters shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)  # below 1e-6: greedy, as OpenAI's 0
    top_k: int = Field(0, ge=-1)  # HOPE/vLLM extension; 0 or -1 (vLLM's "disabled"): no limit
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None
    session_id: str | None = None  # HOPE: the session (else the header X-Session-Id, else `user`)
    learn: bool = True  # HOPE: false: the session is read, used and left unchanged
    ignore_eos: bool = False  # HOPE/vLLM extension: do not stop at end-of-turn/end-of-text tokens

    # not implemented: refused unless neutral (see the module's docstring)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] = Field(default_factory=dict)
    # vLLM's and llama.cpp's extensions that change the output, which their clients send here too
    repetition_penalty: float = 1.0
    repeat_penalty: float = 1.0  # llama.cpp's name
    min_p: float = 0.0
    min_tokens: int = 0
    mirostat: int = 0
    include_stop_str_in_output: bool = False
    guided_json: Any = None
    guided_choice: Any = None
    guided_regex: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    grammar: Any = None
    json_schema: Any = None

    @field_validator("top_k")
    @classmethod
    def _no_limit(cls, v: int) -> int:
        return max(v, 0)

    @field_validator("repetition_penalty", "repeat_penalty")
    @classmethod
    def _no_repetition_penalty(cls, v: float) -> float:
        return _neutral(v, v == 1, "repetition penalties are not supported; only 1")

    @field_validator("min_p", "min_tokens", "mirostat")
    @classmethod
    def _no_sampler_extension(cls, v: float) -> float:
        return _neutral(v, v == 0, "min_p, min_tokens and mirostat are not supported; only 0")

    @field_validator("include_stop_str_in_output")
    @classmethod
    def _stop_not_included(cls, v: bool) -> bool:
        return _neutral(v, not v, "include_stop_str_in_output is not supported; only false")

    @field_validator("guided_json", "guided_choice", "guided_regex", "guided_grammar", "structured_outputs",
                     "grammar", "json_schema")
    @classmethod
    def _no_constrained_decoding(cls, v: Any) -> Any:
        return _neutral(v, v is None or v == {} or v == [] or v == "",
                        "constrained decoding (guided_*, structured_outputs, grammar, json_schema) is not supported")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        return _only_one_choice(v)

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        return _neutral(v, v == 0, "penalties are not supported; only 0")

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict[str, float]) -> dict[str, float]:
        return _neutral(v, not v, "logit_bias is not supported; only an empty map")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        return _stop_list(v)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None  # null only in an assistant's message, as at OpenAI
    name: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role  # OpenAI's newer name for system


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)  # the most likely tokens at each position
    # not implemented: refused unless neutral (see the module's docstring)
    tools: list[Any] = Field(default_factory=list)
    functions: list[Any] = Field(default_factory=list)
    tool_choice: Literal["none", "auto"] = "none"
    response_format: dict[str, Any] = Field(default_factory=lambda: {"type": "text"})

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int, info: ValidationInfo) -> int:
        if v and not info.data.get("logprobs"):  # as at OpenAI: alternatives come with logprobs
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any]) -> list[Any]:
        return _neutral(v, not v, "tool and function calling are not supported; only an empty list")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _neutral(v, v.get("type") == "text", "only response_format {\"type\": \"text\"} is supported")


class CompletionRequest(SamplingFields):
    # text, or token ids of the served tokenizer (as OpenAI's and vLLM's clients send them), or a
    # list of either; validated by `_prompts` (into a list of prompts), not by the type
    prompt: Annotated[list[str | list[int]], SkipValidation, WithJsonSchema({"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "minItems": 1},
    ]})]
    max_tokens: int | None = Field(None, ge=0)  # None: OpenAI's 16 (capped by the limit); 0 scores the prompt
    echo: bool = False
    # each token's log-probability, with the `logprobs` most likely tokens and the token itself
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    # not implemented: refused unless neutral (see the module's docstring)
    suffix: str = ""
    best_of: int = 1

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str) -> str:
        return _neutral(v, not v, "suffix is not supported")

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, v: int) -> int:
        return _neutral(v, v == 1, "only best_of=1 is supported (a session is one stream)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> list[str | list[int]]:
        """One text or one list of token ids (checked against the vocabulary later), or a list
        of such prompts. The shape is checked here, in one pass: a union of list types would be
        tried member by member on every element of a list of two million ids, with an error for
        each element that fails, all turned into one answer on the event loop."""
        if isinstance(v, str) or _token_ids(v, empty=False):
            return [v]
        if v == []:
            raise ValueError("an empty list is no prompt: send a string or a list of token ids")
        if isinstance(v, list) and all(isinstance(p, str) or _token_ids(p, empty=True) for p in v):
            return v
        raise ValueError("a prompt is a string or a list of token ids (integers), or a list of either")


def _token_ids(v: Any, empty: bool) -> bool:
    """Whether `v` is a list of token ids: integers, not booleans (JSON's true is no id)."""
    return isinstance(v, list) and (empty or bool(v)) and all(type(t) is int for t in v)


class TokenizeRequest(OpenAIRequest):
    """vLLM's /tokenize: a `prompt` or chat `messages`, exactly one."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    add_generation_prompt: bool = True  # messages: end with <|assistant|>, as chat's prompt does
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _one_input(cls, v: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if (info.data.get("prompt") is None) == (v is None):
            raise ValueError("give either prompt or messages")
        return v


class DetokenizeRequest(OpenAIRequest):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


class ForkRequest(BaseModel):
    new_id: SessionId


# ---- responses -------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int  # tokens absorbed from the prompt (re-sent history is not absorbed again)
    completion_tokens: int
    total_tokens: int


class SessionInfo(BaseModel):
    """HOPE: where the session stands after the request (version None: not stored)."""

    id: str | None
    version: int | None
    tokens_absorbed: int
    resent_messages: int = 0  # leading request messages recognised as already absorbed
    learned: bool = True


class Surprise(BaseModel):
    """HOPE (stream_options.include_surprise): per token, its text and loss = -log p."""

    tokens: list[str]
    loss: list[float]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    session: SessionInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None
    surprise: Surprise | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format. Per token, `top_logprobs` maps the text of the most likely tokens
    and of the token itself to their log-probabilities (up to logprobs + 1 entries; tokens of one
    text share an entry, the more likely one's)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None
    surprise: Surprise | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hope"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # a session has no context length: the most one request may absorb
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info: what a client needs to tokenize for this server itself."""

    tokenizer_class: str = "HopeTokenizer"
    eos_token: str
    bos_token: str
    pad_token: str | None = None
    chat_template: str
    model_max_length: int  # HOPE_MAX_PROMPT_TOKENS: a session has no context length
    vocab_size: int
    special_tokens: list[str]  # ids 0, 1, ... in this order


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    version: int
    tokens_absorbed: int
    updates: dict[str, int]
    state_bytes: int
    created: int
    updated: int
    checkpoint: str  # fingerprint of the checkpoint whose state this is
    messages_logged: int  # chat messages absorbed (what history de-duplication knows of)
    # per level (titans, fast, mid): ||delta W|| / ||W|| of the latest update at that level
    last_update_norms: dict[str, float] = Field(default_factory=dict)


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class Health(BaseModel):
    status: str
    detail: dict[str, str] = Field(default_factory=dict)


# sent as null rather than left out: OpenAI's own, and the session's id/version when it has none
KEEP_NULL = frozenset({"finish_reason", "logprobs", "top_logprobs", "id", "version"})


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict without null fields (our extensions, `role` in later deltas), except the
    ones OpenAI always sends."""
    return _drop_nulls(model.model_dump(mode="json"))


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None or k in KEEP_NULL}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value
