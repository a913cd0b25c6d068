"""OpenAI-style errors: one exception type the handlers raise, one body shape clients see.

Every failure a client can cause is an `APIError` carrying the HTTP status and the
fields of OpenAI's error object, so the app answers `{"error": {...}}` and never a
traceback.
"""

from __future__ import annotations

from typing import Any

INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"


class APIError(Exception):
    """A request answered with an error status and an OpenAI error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(
    message: str, *, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, status=400, param=param, code=code)


def unsupported(param: str, detail: str = "") -> APIError:
    """A field this server knows about but does not implement: say so, never ignore it."""
    message = f"'{param}' is not supported by this server"
    if detail:
        message += f": {detail}"
    return APIError(message, status=400, param=param, code="unsupported_parameter")


def model_not_found(requested: str, served: str) -> APIError:
    return APIError(
        f"The model '{requested}' does not exist; this server serves '{served}'",
        status=404,
        type=INVALID_REQUEST,
        param="model",
        code="model_not_found",
    )


def not_ready() -> APIError:
    return APIError(
        "the model is still loading; retry when /health answers 200",
        status=503,
        type=UNAVAILABLE,
        code="model_not_ready",
    )
