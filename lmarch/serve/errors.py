"""Errors in OpenAI's shape: ``{"error": {"message", "type", "code"}}`` with a 4xx status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ApiError(Exception):
    """A request the server refuses: ``status`` (400, 401, 404, 413, 429 ...), a message for
    the client, OpenAI's ``type`` and a machine-readable ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.type = status, message, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response for this error."""
        return error_response(self.status, self.message, self.code, self.type, self.headers)


def error_response(
    status: int,
    message: str,
    code: str,
    type: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """``{"error": {"message", "type", "code", "param": null}}`` with ``status``."""
    body = {"error": {"message": message, "type": type, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


__all__ = ["ApiError", "error_response"]
