"""How a gateway request fails: `GatewayError` (a gRPC status, and the request field at fault), the
client-facing status for a worker's error, and the reason each status is counted under in the
`requests_rejected{reason}` metric. The HTTP API answers with an `ApiError` (an HTTP status and
OpenAI's error body) and maps the same statuses to HTTP codes (http.py)."""
from __future__ import annotations

import grpc

Code = grpc.StatusCode

# requests_rejected{reason} by the status a request ended with; any other status counts as "error".
_REJECT_REASONS = {Code.INVALID_ARGUMENT: "invalid", Code.NOT_FOUND: "unknown_model", Code.UNAVAILABLE: "unavailable",
                   Code.RESOURCE_EXHAUSTED: "queue_full", Code.DEADLINE_EXCEEDED: "deadline",
                   Code.CANCELLED: "cancelled", Code.UNAUTHENTICATED: "unauthenticated"}


class GatewayError(Exception):
    """Ends a request with a gRPC status (the message names the worker or the field; `field` is the
    request field at fault, when one is)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def reject_reason(code: grpc.StatusCode) -> str:
    """The `requests_rejected` label of a request that ended with `code`."""
    return _REJECT_REASONS.get(code, "error")


def worker_error(role: str, address: str, exc: grpc.aio.AioRpcError) -> GatewayError:
    """The client-facing status for a worker's error."""
    code, details = exc.code(), exc.details() or ""
    if code == Code.INVALID_ARGUMENT:
        return GatewayError(code, f"{role} worker {address} rejected the request: {details}")
    if code == Code.DEADLINE_EXCEEDED:
        return GatewayError(code, f"deadline exceeded waiting for {role} worker {address}")
    if code == Code.RESOURCE_EXHAUSTED:
        return GatewayError(code, f"{role} worker {address} is at capacity: {details}")
    if code in (Code.UNAVAILABLE, Code.CANCELLED):
        return GatewayError(Code.UNAVAILABLE, f"{role} worker {address} unavailable: {code.name}: {details}")
    return GatewayError(Code.INTERNAL, f"{role} worker {address} failed: {code.name}: {details}")


# HTTP status -> OpenAI error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error", 504: "server_error"}


class ApiError(Exception):
    """An error answer: HTTP status, message, the request field at fault (`param`) and a short code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message if message.startswith(param) else f"{param}: {message}", param, code)
