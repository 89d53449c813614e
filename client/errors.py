"""Typed client errors: callers branch on the kind of failure, not on message text."""

from __future__ import annotations


class BirdgenError(Exception):
    """Base of every error the client raises."""


class InvalidRequestError(BirdgenError):
    """The request was rejected (locally before sending, or by the server with INVALID_ARGUMENT)."""


class ServerUnavailableError(BirdgenError):
    """No server answered at the URL (down, wrong address, or not ready)."""

    state = "unavailable"

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"birdgen server at {url} is {self.state}: {detail}")
        self.url = url
        self.detail = detail


class ServerOverloadedError(ServerUnavailableError):
    """The server is up but refused the request for load: its queue for the model was full, or the
    request waited there past the queue timeout (Triton's UNAVAILABLE "Exceeds maximum queue size" /
    "Request timeout expired", or gRPC's RESOURCE_EXHAUSTED). Nothing was computed, so the same
    request may be sent again; `retry_after_s` is how long this client's retry policy would wait next
    (the gateway's Retry-After). A ServerUnavailableError, so code that waits out an outage waits this
    out too."""

    state = "overloaded"

    def __init__(self, url: str, detail: str, retry_after_s: float) -> None:
        super().__init__(url, detail)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(BirdgenError):
    """The call did not finish within its deadline, whether the deadline fell during an attempt or
    between retries. A call that was retrying keeps its last retryable failure in `last_error`
    (a ServerUnavailableError), also named in the message."""

    def __init__(self, message: str, last_error: BirdgenError | None = None) -> None:
        super().__init__(message if last_error is None else f"{message}; last failure: {last_error}")
        self.last_error = last_error


class AdminKeyRequiredError(BirdgenError):
    """A model-control (admin) call to a server whose admin protocols are locked, without its key
    (contracts.ADMIN_KEY_GRPC in `headers`, e.g. from BIRDGEN_ADMIN_KEY). Never retried."""


class GenerationError(BirdgenError):
    """The server accepted the request but failed to produce the output."""
