"""Units of the Llama family: Llama, Mistral, Qwen2 (RMSNorm, RoPE, GQA, optional biases)."""

from __future__ import annotations

import torch

from dataplane.attention import paged_attention
from dataplane.batch import BatchInput
from dataplane.models.layers import activation, linear, rms_norm
from dataplane.models.rope import RopeSpec, apply_rotary
from dataplane.models.spec import ModelSpec
from dataplane.units import unit_layer

EMBED = "model.embed_tokens.weight"


class LlamaAdapter:
    """Maps Llama-family units to checkpoint tensors and builds their executors.

    Invariant: ``tensor_names(unit)`` lists exactly the tensors ``build(unit, ...)`` reads;
    a tied checkpoint serves the head from the embedding matrix.
    """

    def __init__(self, spec: ModelSpec, available: set[str]) -> None:
        self.spec = spec
        self.available = available
        self.rope = RopeSpec.from_hf_config(spec.raw_config, spec.head_dim)

    def _optional(self, *names: str) -> list[str]:
        return [n for n in names if n in self.available]

    def tensor_names(self, unit: str) -> list[str]:
        if unit == "embed":
            return [EMBED]
        if unit == "head":
            head = "lm_head.weight" if "lm_head.weight" in self.available else EMBED
            return ["model.norm.weight", head]
        layer = unit_layer(unit)
        p = f"model.layers.{layer}."
        if unit.endswith(".attn"):
            projections = [f"{p}self_attn.{x}_proj" for x in "qkvo"]
            return ([f"{p}input_layernorm.weight"] + [f"{w}.weight" for w in projections]
                    + self._optional(*(f"{w}.bias" for w in projections)))
        matrices = [f"{p}mlp.{x}_proj" for x in ("gate", "up", "down")]
        return ([f"{p}post_attention_layernorm.weight"] + [f"{w}.weight" for w in matrices]
                + self._optional(*(f"{w}.bias" for w in matrices)))

    def build(self, unit: str, tensors: dict[str, torch.Tensor], kv_pool: torch.Tensor | None = None):
        pick = lambda names: [tensors.get(n) for n in names]  # noqa: E731
        if unit == "embed":
            return Embed(tensors[EMBED])
        if unit == "head":
            norm, head = pick(self.tensor_names("head"))
            return Head(norm, head, self.spec.norm_eps)
        layer = unit_layer(unit)
        p = f"model.layers.{layer}."
        if unit.endswith(".attn"):
            weights = {x: (tensors[f"{p}self_attn.{x}_proj.weight"], tensors.get(f"{p}self_attn.{x}_proj.bias")) for x in "qkvo"}
            return Attention(self.spec, self.rope, layer, tensors[f"{p}input_layernorm.weight"], weights, kv_pool)
        weights = {x: (tensors[f"{p}mlp.{x}_proj.weight"], tensors.get(f"{p}mlp.{x}_proj.bias")) for x in ("gate", "up", "down")}
        return Mlp(self.spec, tensors[f"{p}post_attention_layernorm.weight"], weights)


class Embed:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def forward(self, hidden, batch: BatchInput) -> torch.Tensor:
        return self.weight[batch.token_ids]


class Attention:
    def __init__(self, spec: ModelSpec, rope: RopeSpec, layer: int, norm: torch.Tensor, weights: dict, kv_pool) -> None:
        self.spec, self.rope, self.layer, self.norm, self.weights, self.kv_pool = spec, rope, layer, norm, weights, kv_pool
        self.window = spec.sliding_windows[layer]

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        spec = self.spec
        x = rms_norm(hidden, self.norm, spec.norm_eps)
        tokens = x.shape[0]
        q = linear(x, *self.weights["q"]).view(tokens, spec.num_heads, spec.head_dim)
        k = linear(x, *self.weights["k"]).view(tokens, spec.num_kv_heads, spec.head_dim)
        v = linear(x, *self.weights["v"]).view(tokens, spec.num_kv_heads, spec.head_dim)
        cos, sin = batch.memo("rope", lambda: self.rope.cos_sin(batch.positions, x.dtype))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, self.kv_pool, batch, spec.head_dim ** -0.5, self.window)
        return hidden + linear(out, *self.weights["o"])


class Mlp:
    def __init__(self, spec: ModelSpec, norm: torch.Tensor, weights: dict) -> None:
        self.spec, self.norm, self.weights = spec, norm, weights
        self.act = activation(spec.hidden_act)

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        x = rms_norm(hidden, self.norm, self.spec.norm_eps)
        gated = self.act(linear(x, *self.weights["gate"])) * linear(x, *self.weights["up"])
        return hidden + linear(gated, *self.weights["down"])


class Head:
    def __init__(self, norm: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self.norm, self.weight, self.eps = norm, weight, eps

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        return linear(rms_norm(hidden[batch.logits_indices], self.norm, self.eps), self.weight)
