"""One exception tree for everything a client can be told went wrong.

    SpigotError                      500 server_error
    ├── InvalidRequest               400 invalid_request_error
    │   ├── ContextLengthExceeded    400 invalid_request_error / context_length_exceeded
    │   ├── ContentFiltered          400 invalid_request_error / content_filter
    │   ├── UnsupportedParameter     400 invalid_request_error / unsupported_parameter
    │   ├── RequestTooLarge          413 invalid_request_error / request_too_large
    │   ├── UnsupportedMediaType     415 invalid_request_error / unsupported_media_type
    │   └── MisdirectedHost          421 invalid_request_error / invalid_host
    ├── AuthenticationFailed         401 invalid_request_error / invalid_api_key
    ├── PermissionDenied             403 permission_error
    ├── NotFound                     404 invalid_request_error
    │   └── ModelNotFoundError       404 invalid_request_error / model_not_found
    ├── RateLimited                  429 rate_limit_exceeded (Retry-After)
    ├── QuotaExceeded                429 insufficient_quota
    └── Overloaded                   503 server_error (Retry-After)
        ├── ShuttingDown             503 server_error / server_shutting_down
        └── UpstreamUnavailable      503 server_error / upstream_unavailable

Each class knows its HTTP status and OpenAI ``type``; instances carry the
``param`` and ``code``. ``to_body()`` is the OpenAI error object.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SpigotError(Exception):
    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return dict(self.extra_headers)
        return {**self.extra_headers, "retry-after": str(max(1, round(self.retry_after)))}


class InvalidRequest(SpigotError):
    status = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class ContentFiltered(InvalidRequest):
    """A prompt matched an input ``block`` rule of the guard policy."""

    default_code = "content_filter"


class UnsupportedParameter(InvalidRequest):
    """A known OpenAI parameter this server does not honour (never silently ignored)."""

    default_code = "unsupported_parameter"


class RequestTooLarge(InvalidRequest):
    status = 413
    default_code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    default_code = "unsupported_media_type"


class MisdirectedHost(InvalidRequest):
    """A keyless server on loopback answers only loopback host names (DNS rebinding)."""

    status = 421
    default_code = "invalid_host"


class AuthenticationFailed(SpigotError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(SpigotError):
    status = 403
    error_type = "permission_error"


class NotFound(SpigotError):
    status = 404
    error_type = "invalid_request_error"


class ModelNotFoundError(NotFound):
    default_code = "model_not_found"


class RateLimited(SpigotError):
    status = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(SpigotError):
    """The key's budget is spent: waiting does not help, so no Retry-After."""

    status = 429
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class Overloaded(SpigotError):
    status = 503
    error_type = "server_error"
    default_code = "overloaded"


class EngineFailure(SpigotError):
    """Generation failed after it started; sent in-band on a stream."""


class ShuttingDown(Overloaded):
    """The server is stopping: new work is refused, running streams end with this."""

    default_code = "server_shutting_down"


class UpstreamUnavailable(Overloaded):
    """No engine behind a model could start the request (down, full, or failing)."""

    default_code = "upstream_unavailable"
