"""The gateway's OpenAPI 3.1 document (GET /openapi.json): every route of gateway/http.py, the request
fields of gateway/api_fields.py with the limits the parser enforces (built from that table, never
copied by hand), the responses and the error body. Built per request from the served model: its
names, its context (max_tokens) and its vocabulary (token ids) are part of the limits.

Cross-field rules the parser enforces are in the schema too (`allOf`): stream_options only with
stream, echo not with logprobs, top_logprobs only with logprobs. One limit no
schema can state is described in prose: prompt tokens + max_tokens must fit the context.
"""
from __future__ import annotations

import copy
from importlib import metadata

from splitserve.gateway.api_fields import FIELDS, REQUIRED, ApiField

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"], "description": "The request field at fault."},
        "code": {"type": ["string", "null"]}}}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"], "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}
_FINISH = {"properties": {"finish_reason": {"enum": ["stop", "length", None]},
                          "stop_reason": {"type": ["string", "integer", "null"]},
                          "index": {"type": "integer"}, "logprobs": {"type": ["object", "null"]}}}
_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": _USAGE, "choices": {"type": "array", "items": {
        "type": "object", "required": ["index", "text", "finish_reason"],
        "properties": {**_FINISH["properties"], "text": {"type": "string"}}}}}}
_CHAT = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": _USAGE, "choices": {"type": "array", "items": {
        "type": "object", "required": ["index", "message", "finish_reason"], "properties": {
            **_FINISH["properties"], "message": {"type": "object", "required": ["role", "content"], "properties": {
                "role": {"const": "assistant"}, "content": {"type": "string"}}}}}}}}
_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}, "root": {"type": "string"}, "max_model_len": {"type": "integer"}}}
_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string"}, "redis": {"type": "string"}}}
# one server-sent event of a streamed answer: `data:` holds a chunk's JSON, an error body, or [DONE]
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_ROLE_HEALTH = {"type": "object", "properties": {"healthy": {"type": "integer"}, "draining": {"type": "integer"},
                                                "total": {"type": "integer"}}}


def _error(description: str) -> dict:
    schema = {"$ref": "#/components/schemas/Error"}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def field_schema(spec: ApiField, max_model_len: int | None, vocab_size: int | None, names: list[str]) -> dict:
    """The JSON Schema of one request field on this model; null (absent) allowed unless required."""
    schema = copy.deepcopy(spec.schema)
    high = spec.high_on(max_model_len)
    if high is not None and "maximum" in schema:
        schema["maximum"] = high
    if spec.name == "model" and names:
        schema = {"type": "string", "enum": list(names)}
    if spec.name == "prompt" and vocab_size is not None:
        for option in schema["anyOf"]:  # token ids: [0, vocab_size)
            items = option.get("items", {})
            items = items.get("items", items)
            if items.get("type") == "integer":
                items["maximum"] = vocab_size - 1
    schema["description"] = spec.doc
    return schema


def request_schema(kind: str, names: list[str], max_model_len: int | None, vocab_size: int | None) -> dict:
    """The body of POST /v1/completions ("completion") or /v1/chat/completions ("chat")."""
    required = REQUIRED[kind]
    properties = {}
    for name, spec in FIELDS[kind].items():
        schema = field_schema(spec, max_model_len, vocab_size, names)
        if name not in required:
            schema = _nullable(schema)
        properties[name] = schema
    rules = [_implies("stream_options", {"type": "object"}, "stream", {"const": True})]
    if kind == "completion":
        rules.append({"not": {"required": ["echo", "logprobs"], "properties": {
            "echo": {"const": True}, "logprobs": {"type": "integer"}}}})
    else:
        rules.append(_implies("top_logprobs", {"type": "integer"}, "logprobs", {"const": True}))
    context = f" The prompt's tokens plus max_tokens must fit the context of {max_model_len} tokens." \
        if max_model_len else ""
    return {"type": "object", "required": list(required), "properties": properties, "allOf": rules,
            "additionalProperties": True,
            "description": "Unknown fields are accepted and ignored (each name is logged once)." + context}


def _nullable(schema: dict) -> dict:
    if "enum" in schema:
        return {**schema, "enum": schema["enum"] + [None]}
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    doc = schema.pop("description", None)
    return {"anyOf": [schema, {"type": "null"}], **({"description": doc} if doc else {})}


def _implies(name: str, when: dict, other: str, must: dict) -> dict:
    """`other` must match `must` whenever `name` is present and matches `when`."""
    return {"if": {"required": [name], "properties": {name: when}},
            "then": {"required": [other], "properties": {other: must}}}


def _generation(kind: str, summary: str, schema_name: str, secured: bool) -> dict:
    responses = {
        "200": {"description": "The answer, or with stream: true server-sent events ending in `data: [DONE]`.",
                "headers": {"x-request-id": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}},
                            "text/event-stream": {"schema": _EVENT}}},
        "400": _error("Invalid input; `param` names the field."), "404": _error("Unknown model."),
        "413": _error("The body is larger than the gateway accepts."),
        "429": _error("At capacity."), "503": _error("No worker of a role is available."),
        "504": _error("The request ran past the gateway's timeout.")}
    if secured:
        responses["401"] = _error("Missing or wrong API key.")
    return {"post": {"summary": summary, "operationId": kind, "responses": responses, "requestBody": {
        "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind}"}}}},
        **({"security": [{"bearer": []}]} if secured else {})}}


def openapi_document(names: list[str], model=None, secured: bool = False) -> dict:
    """The document for a gateway serving `names` of `model` (a prepare.ModelInfo; None before the
    gateway found its workers: limits that depend on the model are left out)."""
    max_model_len = model.max_model_len if model is not None else None
    vocab_size = model.vocab_size if model is not None else None
    auth = {"security": [{"bearer": []}]} if secured else {}
    unauthorized = {"401": _error("Missing or wrong API key.")} if secured else {}
    model_param = {"name": "model", "in": "path", "required": True,
                   "schema": {"type": "string", "maxLength": 4096}}
    try:
        version = metadata.version("splitserve")
    except metadata.PackageNotFoundError:
        version = "0"
    return {
        "openapi": "3.1.0",
        "info": {"title": "splitserve gateway", "version": version,
                 "description": "OpenAI-compatible completions and chat over disaggregated prefill and decode."},
        "paths": {
            "/v1/models": {"get": {"operationId": "models", "summary": "The served model", **auth, "responses": {
                "200": {"description": "The model list.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["object", "data"], "properties": {
                        "object": {"const": "list"},
                        "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}}}},
                **unauthorized}}},
            "/v1/models/{model}": {"get": {"operationId": "model", "summary": "One model's card",
                                           "parameters": [model_param], **auth, "responses": {
                "200": {"description": "The model's card.",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                "404": _error("Unknown model."), **unauthorized}}},
            "/v1/completions": _generation("completion", "Text completion", "Completion", secured),
            "/v1/chat/completions": _generation("chat", "Chat completion", "ChatCompletion", secured),
            "/health": {"get": {"operationId": "health", "summary": "Ready when a prefill and a decode worker answer",
                                "responses": {code: {"description": text, "content": {"application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}}}}
                                    for code, text in (("200", "Ready."), ("503", "Not ready."))}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics", "responses": {
                "200": {"description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "schemas": {"completion": request_schema("completion", names, max_model_len, vocab_size),
                        "chat": request_schema("chat", names, max_model_len, vocab_size),
                        "Completion": _COMPLETION, "ChatCompletion": _CHAT, "Model": _MODEL, "Error": _ERROR,
                        "Health": {**_HEALTH, "properties": {**_HEALTH["properties"], "prefill": _ROLE_HEALTH,
                                                             "decode": _ROLE_HEALTH}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }

