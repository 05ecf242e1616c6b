"""Architecture adapters: which checkpoint tensors each unit needs and how it runs."""

from common.model.architectures import SUPPORTED_ARCHITECTURES
from common.model.spec import ModelSpec


def adapter_for(spec: ModelSpec, available: set[str]):
    if spec.family == "gpt2":
        from dataplane.models.gpt2 import Gpt2Adapter

        return Gpt2Adapter(spec, available)
    from dataplane.models.llama import LlamaAdapter

    return LlamaAdapter(spec, available)


__all__ = ["ModelSpec", "SUPPORTED_ARCHITECTURES", "adapter_for"]
