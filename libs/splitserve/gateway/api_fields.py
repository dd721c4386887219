"""The HTTP API's request fields and limits, declared once: the parser (gateway/openai_api.py) reads
every bound from here and the OpenAPI document (gateway/openapi.py) is built from the same table, so
the two cannot drift apart. A field's `schema` is the JSON Schema of the values it accepts; `null`
is accepted for every optional field and means "absent" (its default).

Limits a client can meet (all refused with a 400 that names the field and the limit):
- `max_tokens`: prompt tokens + max_tokens <= the model's context (max_model_len). Absent: 16 for
  completions (OpenAI's default), the rest of the context for chat (vLLM's); a default is clipped to
  the room the prompt leaves, so leaving it out never gets a request refused.
- `n` <= MAX_N choices, <= MAX_PROMPTS prompts per completions call, <= MAX_STOP stop strings,
  <= MAX_STOP_TOKEN_IDS stop token ids, logprobs / top_logprobs <= MAX_LOGPROBS alternatives.
- The body: JSON (UTF-8, -16 or -32; another charset only when the Content-Type names it), an object,
  nested at most MAX_JSON_DEPTH levels, no unpaired UTF-16 surrogates in any string.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.sampling_params import MAX_LOGPROBS

MAX_N = 16  # choices per request (each is a full request through the workers)
MAX_PROMPTS = 64  # prompts in one completions call
MAX_STOP = 16  # stop strings
MAX_STOP_TOKEN_IDS = 256  # stop token ids
MAX_JSON_DEPTH = 32  # nesting of the request body (a valid one needs 6: body.messages[i].content[j].text)
MAX_USER_CHARS = 1024
MAX_CACHE_SALT_CHARS = 256
INT32_MAX = 2**31 - 1  # the wire's top_k is an int32
UINT32_MAX = 2**32 - 1  # the wire's token ids and max_tokens are uint32
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # the wire's seed is an int64
# The accepted forms of a field this server does not implement: absent, or empty.
EMPTY = (None, [], {}, "")


@dataclass(frozen=True)
class ApiField:
    """One request field: the JSON Schema of what it accepts, and its bounds when it is a number.

    `low`/`high` (and `low_open`) are the parser's range for integer and number fields; `kind`
    names the parser's reading ("integer", "number", "boolean", "string", or "custom" for fields
    with their own code in openai_api.py)."""

    name: str
    kind: str
    doc: str
    schema: dict
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    default: object = None
    max_len: int | None = None  # strings: most characters
    context_bound: bool = False  # an output length: at most max_model_len - 1 on a given model

    def high_on(self, max_model_len: int | None) -> float | None:
        """The upper bound on a model with this context (None: not known)."""
        if self.context_bound and max_model_len is not None and self.high is not None:
            return min(self.high, max_model_len - 1)
        return self.high


def integer(name: str, low: int, high: int, doc: str, default: int | None = None,
            context_bound: bool = False) -> ApiField:
    return ApiField(name, "integer", doc, {"type": "integer", "minimum": low, "maximum": high}, low, high,
                    default=default, context_bound=context_bound)


def number(name: str, low: float, high: float, doc: str, default: float | None = None,
           low_open: bool = False) -> ApiField:
    bound = {"exclusiveMinimum": low} if low_open else {"minimum": low}
    return ApiField(name, "number", doc, {"type": "number", **bound, "maximum": high}, low, high, low_open, default)


def boolean(name: str, doc: str, default: bool = False) -> ApiField:
    return ApiField(name, "boolean", doc, {"type": "boolean"}, default=default)


def string(name: str, max_len: int, doc: str) -> ApiField:
    return ApiField(name, "string", doc, {"type": "string", "maxLength": max_len}, default="", max_len=max_len)


def only(name: str, values: tuple, doc: str) -> ApiField:
    """A field accepted for compatibility with only these values (the rest: 400 unsupported_parameter)."""
    return ApiField(name, "custom", doc, {"enum": [v for v in values if v is not None]})


_STRING_LIST = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"enum": ["system", "user", "assistant", "developer"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}}}

COMMON = (
    ApiField("model", "custom", "The served model's name (GET /v1/models lists it).", {"type": "string"}),
    boolean("stream", "Stream the answer as server-sent events ending in `data: [DONE]`."),
    ApiField("stream_options", "custom", "Only with stream: true. include_usage adds a last chunk with the usage.",
             {"type": "object", "properties": {"include_usage": {"type": ["boolean", "null"]}}}),
    integer("n", 1, MAX_N, "Choices to generate for each prompt.", 1),
    only("best_of", (1,), "Only 1: candidates are not ranked (as in vLLM's V1 engine)."),
    integer("max_tokens", 1, UINT32_MAX, "Most tokens to generate; prompt tokens + max_tokens must fit the "
            "model's context (max_model_len).", context_bound=True),
    number("temperature", 0.0, 2.0, "0 is greedy.", 1.0),
    number("top_p", 0.0, 1.0, "Nucleus sampling mass.", 1.0, low_open=True),
    integer("top_k", -1, INT32_MAX, "Keep the k most likely tokens; 0 or -1: off.", 0),
    number("min_p", 0.0, 1.0, "Drop tokens below min_p times the most likely one's probability.", 0.0),
    integer("seed", SEED_MIN, SEED_MAX, "Per-request seed; with n > 1, choice i uses seed + i."),
    ApiField("stop", "custom", f"A stop string or at most {MAX_STOP}; the text is cut before the first one.",
             {"anyOf": [{"type": "string", "minLength": 1},  # [] is accepted: no stop strings
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]}),
    ApiField("stop_token_ids", "custom", f"At most {MAX_STOP_TOKEN_IDS} token ids that end generation.",
             {"type": "array", "maxItems": MAX_STOP_TOKEN_IDS,
              "items": {"type": "integer", "minimum": 0, "maximum": UINT32_MAX}}),
    boolean("ignore_eos", "Keep generating past the end-of-sequence token."),
    boolean("skip_special_tokens", "Leave special tokens out of the text.", True),
    boolean("include_stop_str_in_output", "Keep the matched stop string at the end of the text."),
    string("cache_salt", MAX_CACHE_SALT_CHARS, "Prefix-cache namespace: requests share cached blocks only "
           "with requests of the same salt."),
    string("user", MAX_USER_CHARS, "Accepted for compatibility; not used."),
    only("presence_penalty", (0,), "Only 0 (penalties are not implemented)."),
    only("frequency_penalty", (0,), "Only 0 (penalties are not implemented)."),
    only("repetition_penalty", (1,), "Only 1 (penalties are not implemented)."),
    only("logit_bias", EMPTY, "Only empty (logit biases are not implemented)."),
)

COMPLETION = COMMON + (
    ApiField("prompt", "custom", f"A string, at most {MAX_PROMPTS} strings, token ids, or at most "
             f"{MAX_PROMPTS} arrays of token ids; none empty.",
             {"anyOf": [{"type": "string", "minLength": 1}, {**_STRING_LIST, "maxItems": MAX_PROMPTS},
                        _TOKEN_IDS, {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS}]}),
    boolean("echo", "Prepend the prompt to the text (not with logprobs)."),
    integer("logprobs", 0, MAX_LOGPROBS, "The sampled token's logprob and this many alternatives per token."),
    only("suffix", EMPTY, "Only empty (no fill-in-the-middle)."),
)

CHAT = COMMON + (
    ApiField("messages", "custom", "The conversation: {role, content}; content is a string or text parts.",
             {"type": "array", "items": _MESSAGE, "minItems": 1}),
    integer("max_completion_tokens", 1, UINT32_MAX, "Wins over max_tokens when both are given.",
            context_bound=True),
    boolean("logprobs", "Return the sampled tokens' logprobs."),
    integer("top_logprobs", 0, MAX_LOGPROBS, "Alternatives per token; needs logprobs: true."),
    only("tools", EMPTY, "Only empty (no tool calling)."),
    only("functions", EMPTY, "Only empty (no tool calling)."),
    only("tool_choice", EMPTY + ("none",), "Only \"none\" (no tool calling)."),
    only("response_format", (None, {"type": "text"}), "Only {\"type\": \"text\"}."),
)

FIELDS = {"completion": {f.name: f for f in COMPLETION}, "chat": {f.name: f for f in CHAT}}
REQUIRED = {"completion": ("model", "prompt"), "chat": ("model", "messages")}
