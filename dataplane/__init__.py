"""FlexPipe data plane: model units, stages, KV cache, engine and transports."""

from common.errors import (
    CheckpointError,
    FlexPipeError,
    InvalidRequestError,
    PipelineError,
    RefactorAborted,
    RefactorRefused,
    RequestFailed,
    RequestTimeout,
    UnsupportedModelError,
)
from dataplane.engine.sampling_params import CompletionOutput, RequestOutput, SamplingParams


def __getattr__(name):
    if name == "LLM":
        from dataplane.llm.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "FlexPipeError",
    "InvalidRequestError",
    "PipelineError",
    "CheckpointError",
    "UnsupportedModelError",
    "RefactorRefused",
    "RefactorAborted",
    "RequestFailed",
    "RequestTimeout",
]
