"""A request body read and its fields checked, before anything reaches a replica: each violation is
an :class:`ApiError` (a 4xx in OpenAI's error shape) naming the field, its value (shortened) and
the fix. The body must be a JSON object nested at most :data:`MAX_DEPTH` levels, every string in it
text that UTF-8 can encode; numbers must be finite and in range."""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # an OpenAI request nests about 6 levels (messages[i].content[j].image_url.url)
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit integer, as OpenAI's seed is


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = headers  # sent with the response (Retry-After of a 429)

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message never echoes a huge value whole."""
    text = (
        repr(value) if not isinstance(value, int) or abs(value) < 10**60 else f"an integer of {_digits(value)} digits"
    )
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _digits(value: int) -> int:
    return math.floor(abs(value).bit_length() * math.log10(2)) + 1


def parse_body(raw: bytes) -> dict:
    """``raw`` as a JSON object, nested at most :data:`MAX_DEPTH` levels, all of its text encodable."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, and integers of more than 4300 digits
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _walk(body)
    return body


def _too_deep() -> ApiError:
    return ApiError(
        400, f"the request body nests JSON more than {MAX_DEPTH} levels deep; send a flatter OpenAI request"
    )


def _walk(body: dict) -> None:
    """Every value of ``body``, without recursion: its depth, and each string (keys too) UTF-8 can encode."""
    stack: list[tuple[str, Any, int]] = [("", body, 1)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _too_deep()
        if isinstance(value, str):
            _text(value, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _text(k, where or "the request body")
                stack.append((f"{where}.{k}" if where else k, v, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))


def _text(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(
            400,
            f"'{where}' holds text that cannot be encoded ({shown(value[e.start : e.end])}, a lone UTF-16 "
            f"surrogate, at character {e.start}); send valid Unicode text",
            param=where,
        ) from None


def number(body: dict, name: str, default, low, high, kind=float):
    """``body[name]`` as a finite number in [low, high], else a 400 naming it."""
    value = body.get(name, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise ApiError(400, f"'{name}' must be a number, not {shown(value)}", param=name)
    if not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, not {value}; send one in [{low}, {high}]", param=name)
    value = kind(value)
    if value < low:
        raise ApiError(400, f"'{name}' is {value}; it must be at least {low}", param=name)
    if value > high:
        raise ApiError(400, f"'{name}' is {value}; it must be at most {high}", param=name)
    return value


def check_options(body: dict) -> None:
    """The fields fitmap serve takes as OpenAI defines them but supports only in part."""
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise ApiError(
            400, f"'n' is {shown(n)}; only n=1 is supported (send the request again for another answer)", param="n"
        )
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise ApiError(
            400, f"'stream' must be a boolean (true or false, not quoted), not {shown(stream)}", param="stream"
        )


def seed(body: dict) -> int | None:
    """``body["seed"]``: None, or a 64-bit integer."""
    value = body.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'seed' must be an integer, not {shown(value)}", param="seed")
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise ApiError(
            400,
            f"'seed' is {shown(value)}; it must be a 64-bit integer, from {low} to {high}",
            param="seed",
        )
    return value
