"""The HTTP API's request body as a JSON object, or an `ApiError` 400 that says what is wrong:
the encoding (UTF-8, -16 or -32, told apart by the first bytes, or the charset the Content-Type
names), JSON syntax (numbers beyond Python's 4,300 digits included), nesting deeper than
MAX_JSON_DEPTH, and strings holding unpaired UTF-16 surrogate escapes ("\\ud800" is valid JSON
syntax but no Unicode text: it would fail in the tokenizer or when the answer is encoded).
Any content type is read as JSON, so `curl -d` (a form type) works as clients expect.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Any

from splitserve.gateway.api_fields import MAX_JSON_DEPTH
from splitserve.gateway.errors import ApiError, bad

_SURROGATE = re.compile("[\ud800-\udfff]")


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, message, None, "invalid_json")


def parse_json(raw: bytes, content_type: str | None = None) -> dict:
    """The request body as a JSON object, or ApiError 400. The body is UTF-8, -16 or -32 (told
    apart by its first bytes), or the charset the Content-Type names; any content type is read as
    JSON (curl's default form type included). Strings may hold no unpaired surrogates (they are not
    text: they would fail in the tokenizer), and nesting is at most MAX_JSON_DEPTH levels."""
    text: str | bytes = raw
    charset = _charset(content_type)
    if charset is not None and codecs.lookup(charset).name not in ("utf-8", "utf-16", "utf-32"):
        try:
            text = raw.decode(charset)
        except UnicodeDecodeError as e:
            raise _invalid_json(f"the request body is not valid {charset}: {e.reason} at byte {e.start}") from None
        except LookupError:  # a bytes-to-bytes codec such as base64
            raise _invalid_json(f"charset {charset!r} in the Content-Type header is not a text encoding") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise _invalid_json(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError as e:
        raise _invalid_json(f"the request body is not UTF-8, -16 or -32 text ({e.reason} at byte {e.start}); "
                            "name another charset in the Content-Type header") from None
    except ValueError as e:
        hint = f" (Content-Type was {content_type[:60]!r})" if content_type and "json" not in content_type else ""
        raise _invalid_json(f"the request body is not valid JSON{hint}: {e}") from None
    if not isinstance(body, dict):
        raise _invalid_json(f"the request body must be a JSON object, got {json_type(body)}")
    _check_tree(body)
    return body


def _charset(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type, checked (ApiError for one Python does not know)."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            value = value.strip().strip('"')
            try:
                codecs.lookup(value)
            except (LookupError, ValueError):
                raise _invalid_json(f"unknown charset {value[:40]!r} in the Content-Type header") from None
            return value
    return None


_SCALARS = frozenset((int, float, bool, type(None)))  # what json.loads makes that holds no string


def _check_tree(body: dict) -> None:
    """ApiError naming the place of the first string (value or key) with an unpaired surrogate, or
    of nesting deeper than MAX_JSON_DEPTH. Iterative: a hostile body cannot exhaust the stack."""
    todo: list[tuple[Any, str, int]] = [(body, "", 1)]
    while todo:
        value, path, depth = todo.pop()
        if depth > MAX_JSON_DEPTH:
            raise _invalid_json(f"the request body nests deeper than {MAX_JSON_DEPTH} levels (at {path})")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                where = path or "the request body"
                raise bad(where, f"{where} holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
                                 "not a Unicode character", "invalid_string")
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise ApiError(400, f"{path or 'the request body'} has a field name holding an unpaired UTF-16 "
                                   "surrogate escape (\\ud800-\\udfff)", path or None, "invalid_string")
                todo.append((item, name, depth + 1))
        elif isinstance(value, list):
            if depth >= MAX_JSON_DEPTH:  # an item here is too deep, whatever it is
                todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value[:1]))
            elif not _SCALARS.issuperset(map(type, value)):  # (one scan in C: a prompt's ids pass here)
                # numbers, booleans and nulls hold nothing to check: only the other items are queued
                todo.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)
                            if isinstance(item, (str, dict, list)))


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"
