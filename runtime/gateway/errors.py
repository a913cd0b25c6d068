"""OpenAI-style error bodies, so clients (the openai SDK) raise the right exception."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, code: str | None = None, param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status)


def model_not_found(model: str) -> JSONResponse:
    return error_response(
        404,
        f"The model `{model}` does not exist. GET /v1/models lists the served models.",
        "invalid_request_error",
        code="model_not_found",
        param="model",
    )


def no_ready_worker(model: str) -> JSONResponse:
    return error_response(
        503,
        f"The model `{model}` has no ready worker right now; retry later.",
        "service_unavailable",
        code="no_ready_worker",
    )


def bad_request(message: str, param: str | None = None) -> JSONResponse:
    return error_response(400, message, "invalid_request_error", code=None, param=param)


def upstream_failed(model: str, attempts: int, detail: str) -> JSONResponse:
    return error_response(
        502,
        f"Every worker tried for `{model}` failed ({attempts} attempt(s)); last error: {detail}",
        "upstream_error",
        code="upstream_failed",
    )
