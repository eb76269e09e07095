"""Pydantic models of the HTTP API: OpenAI completions/chat requests with the sparse extensions, the
vLLM-style tokenize/detokenize bodies, and the response shapes (for the OpenAPI document).

Unknown fields are ignored (``extra="ignore"``); booleans are strict (``"stream": "yes"`` is a 400, as at
OpenAI). Fields OpenAI or vLLM define that this server does not implement are listed in
:data:`UNSUPPORTED_FIELDS` with the values that mean "off"; anything else is a 400 naming the field (see
:func:`check_unsupported`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

MAX_N = 16
MAX_LOGPROBS = 5
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            "minItems": 1,
        },
    ],
    "description": "a string, a list of strings, a list of token ids, or a list of token-id lists",
}
_PATTERN_SCHEMA = {
    "anyOf": [
        {"type": "string", "examples": ["dense", "quest:20", "vertical_slash:8+quest:20"]},
        {"type": "object", "additionalProperties": True},
        {"type": "null"},
    ],
    "description": "METHOD[:RATIO] | PREFILL[:RATIO]+DECODE[:RATIO], or "
    '{"prefill": {"method", "compression_ratio", "params"}, "decode": {...}}',
}
_RATIO_SCHEMA = {
    "anyOf": [{"type": "number", "minimum": 1}, {"type": "null"}],
    "description": "target compression ratio (>= 1) for every phase whose pattern names none",
}
_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "object", "properties": {"type": {"type": "string"},
                                                                       "text": {"type": "string"}}}},
        {"type": "null"},
    ]
}

PromptField = Annotated[Any, WithJsonSchema(_PROMPT_SCHEMA)]
PatternField = Annotated[Any, WithJsonSchema(_PATTERN_SCHEMA)]
RatioField = Annotated[Any, WithJsonSchema(_RATIO_SCHEMA)]
ContentField = Annotated[Any, WithJsonSchema(_CONTENT_SCHEMA)]
StopField = str | list[str] | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class SparseFields(_Body):
    sparse_pattern: PatternField = None
    compression_ratio: RatioField = None
    vllm_xargs: dict[str, str | int | float | bool | None] | None = Field(
        None, description='vLLM-style extra args; {"sparse_pattern": ..., "compression_ratio": ...} are read'
    )


class SamplingFields(SparseFields):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopField = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False
    user: str | None = None
    # recognised; only their "off" values are accepted (see UNSUPPORTED_FIELDS)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    best_of: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    prompt_logprobs: int | None = None
    use_beam_search: StrictBool | None = None


class CompletionRequest(SamplingFields):
    prompt: PromptField = Field(...)
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: the prompt only (scored with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    suffix: str | None = None
    add_special_tokens: StrictBool = True


class ChatMessage(_Body):
    role: str
    content: ContentField = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


# Messages are checked one by one by the route (server/api/prompts.py), after their count: building a pydantic
# model per message costs tens of microseconds, and a body can hold a million of them.
MessagesField = Annotated[list[Any], WithJsonSchema({"type": "array", "items": ChatMessage.model_json_schema(),
                                                     "minItems": 1})]


class ChatCompletionRequest(SamplingFields):
    messages: MessagesField = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    echo: StrictBool = False
    parallel_tool_calls: StrictBool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None


def _off_penalty(v: Any) -> bool:
    return v is None or v == 0


UNSUPPORTED_FIELDS: dict[str, Any] = {
    # field -> predicate "this value means the feature is off"
    "presence_penalty": _off_penalty,
    "frequency_penalty": _off_penalty,
    "repetition_penalty": lambda v: v is None or v == 1,
    "logit_bias": lambda v: not v,
    "min_p": _off_penalty,
    "min_tokens": _off_penalty,
    "response_format": lambda v: v is None or v.get("type") in (None, "text"),
    "tools": lambda v: not v,
    "tool_choice": lambda v: v is None or v == "none",
    "functions": lambda v: not v,
    "function_call": lambda v: v is None or v == "none",
    "guided_json": lambda v: v is None,
    "guided_regex": lambda v: v is None,
    "guided_choice": lambda v: v is None,
    "guided_grammar": lambda v: v is None,
    "prompt_logprobs": lambda v: v is None,
    "use_beam_search": lambda v: not v,
    "suffix": lambda v: not v,
    "modalities": lambda v: v is None or list(v) == ["text"],
    "audio": lambda v: v is None,
    "prediction": lambda v: v is None,
    "continue_final_message": lambda v: not v,
}


def unsupported_field(body: BaseModel) -> str | None:
    """The first recognised-but-unsupported field set to something other than its "off" value."""
    fields = type(body).model_fields
    for name, is_off in UNSUPPORTED_FIELDS.items():
        if name in fields and not is_off(getattr(body, name)):
            return name
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of not in (1, getattr(body, "n", 1)):
        return "best_of"
    return None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: MessagesField | None = None
    add_generation_prompt: StrictBool = True
    add_special_tokens: StrictBool | None = None
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---- responses (the OpenAPI document's; the routes build the JSON directly, tests check it against these) ----


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The error answers an endpoint documents in the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PrefillCostReport(BaseModel):
    method: str
    target_compression_ratio: float
    achieved_compression_ratio: float
    attention_flops: float
    dense_attention_flops: float
    indexing_flops: float
    fallback: Literal["dense"] | None = Field(
        None, description='"dense" when the method would not have paid at this prompt length and dense attention '
        "ran (achieved ratio 1); null when the method ran. Turn it off with the prefill phase's "
        '"fallback": "never"')
    prompt_logprobs: bool | None = Field(
        None, description="present (true) when the echoed prompt logprobs are this prefill's, sparse or dense")


class DecodeCostReport(BaseModel):
    method: str
    target_compression_ratio: float
    achieved_compression_ratio: float
    kv_bytes_read: float
    dense_kv_bytes_read: float
    metadata_bytes_read: float
    kv_cache_tokens: int


class AutoBand(BaseModel):
    min_tokens: int
    max_tokens: int | None


class AutoReport(BaseModel):
    requested: str
    chosen: str
    max_drop: float | None
    prompt_tokens: int
    band: AutoBand | None
    predicted_drop: float | None
    margin: float | None
    reason: str
    policy: str


class SparseReport(BaseModel):
    prefill: PrefillCostReport
    decode: DecodeCostReport
    model_flops: float
    dense_model_flops: float
    auto: AutoReport | None = Field(None, description="present when the request asked for sparse_pattern 'auto': "
                                    "what the policy chose for the prompt, and why")


_CHOICE_SPARSE = Field(None, description="this choice's own cost, when the request has several prompts or choices "
                       "(the response's sparse object sums them)")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    sparse: SparseReport | None = _CHOICE_SPARSE


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    sparse: SparseReport


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    sparse: SparseReport | None = _CHOICE_SPARSE


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sparse: SparseReport


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: str
