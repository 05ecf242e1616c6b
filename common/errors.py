"""The exception types FlexPipe raises to its users.

Every error a caller can act on derives from ``FlexPipeError`` so that an
application can catch FlexPipe failures without catching programming errors.
"""


class FlexPipeError(Exception):
    """Base class of every error FlexPipe raises on purpose."""


class CheckpointError(FlexPipeError):
    """A model directory is missing, unreadable, corrupt or inconsistent."""


class UnsupportedModelError(FlexPipeError):
    """The checkpoint's architecture has no FlexPipe adapter."""


class PartitionError(FlexPipeError):
    """No layout satisfies the requested stage count and device limits."""


class InvalidRequestError(FlexPipeError, ValueError):
    """A request or sampling parameter is out of range."""


class PipelineError(FlexPipeError):
    """The pipeline cannot serve: a stage process died or stopped answering."""


class RequestFailed(FlexPipeError):
    """One request could not be served (its numbers broke the sampler, a stage could not run it,
    it timed out); the pipeline and every other request go on."""


class RequestTimeout(RequestFailed, TimeoutError):
    """The caller's deadline passed; the request was aborted and its KV blocks freed."""


class TransportError(FlexPipeError):
    """A data-plane channel failed or was configured wrongly."""


class RefactorRefused(FlexPipeError):
    """A refactor was not started (target does not fit, another is running, ...); nothing moved."""


class RefactorAborted(FlexPipeError):
    """A refactor was abandoned before its SWITCH completed; the old layout still serves.
    ``report`` holds what was measured until then."""

    def __init__(self, message: str, report=None) -> None:
        super().__init__(message)
        self.report = report
