"""Units of the Llama family: Llama, Mistral, Qwen2 (RMSNorm, RoPE, GQA, optional biases)."""

from __future__ import annotations

import torch

from common.model.spec import ModelSpec
from common.model.units import unit_layer
from dataplane.models.attention import paged_attention
from dataplane.models.batch import BatchInput
from dataplane.models.layers import activation, linear, rms_norm
from dataplane.models.rope import RopeSpec, apply_rotary_interleaved, interleave_rotary_rows, rotation

EMBED = "model.embed_tokens.weight"


class LlamaAdapter:
    """Maps Llama-family units to checkpoint tensors and builds their executors.

    Invariants: ``tensor_names(unit)`` lists exactly the tensors ``build(unit, ...)`` reads; which biases a
    unit has comes from the spec (``qkv_bias``, ``o_bias``, ``mlp_bias``), never from what the checkpoint
    holds; the head is ``lm_head.weight`` when the checkpoint has it or embeddings are untied (transformers
    does not tie an ``lm_head.weight`` that differs from the embedding), else the embedding matrix.
    """

    def __init__(self, spec: ModelSpec, available: set[str]) -> None:
        self.spec = spec
        self.available = available
        rope_config = {"rope_parameters": spec.rope_parameters, "max_position_embeddings": spec.max_position_embeddings}
        self.rope = RopeSpec.from_hf_config(rope_config, spec.head_dim)

    def tensor_names(self, unit: str) -> list[str]:
        if unit == "embed":
            return [EMBED]
        if unit == "head":
            untied = "lm_head.weight" in self.available or not self.spec.tie_word_embeddings
            return ["model.norm.weight", "lm_head.weight" if untied else EMBED]
        p = f"model.layers.{unit_layer(unit)}."
        if unit.endswith(".attn"):
            projections = [f"{p}self_attn.{x}_proj" for x in "qkvo"]
            biased = projections[:3] * self.spec.qkv_bias + projections[3:] * self.spec.o_bias
            return [f"{p}input_layernorm.weight"] + [f"{w}.weight" for w in projections] + [f"{w}.bias" for w in biased]
        matrices = [f"{p}mlp.{x}_proj" for x in ("gate", "up", "down")]
        biased = matrices * self.spec.mlp_bias
        return (
            [f"{p}post_attention_layernorm.weight"] + [f"{w}.weight" for w in matrices] + [f"{w}.bias" for w in biased]
        )

    def build(self, unit: str, tensors: dict[str, torch.Tensor], kv_pool: torch.Tensor | None = None):
        pick = lambda names: [tensors[n] for n in names]  # noqa: E731
        wanted = set(self.tensor_names(unit))
        bias = lambda name: tensors[name] if name in wanted else None  # noqa: E731
        if unit == "embed":
            return Embed(tensors[EMBED])
        if unit == "head":
            norm, head = pick(self.tensor_names("head"))
            return Head(norm, head, self.spec.norm_eps)
        layer = unit_layer(unit)
        p = f"model.layers.{layer}."
        if unit.endswith(".attn"):
            weights = {
                x: (tensors[f"{p}self_attn.{x}_proj.weight"], bias(f"{p}self_attn.{x}_proj.bias")) for x in "qkvo"
            }
            return Attention(self.spec, self.rope, layer, tensors[f"{p}input_layernorm.weight"], weights, kv_pool)
        weights = {
            x: (tensors[f"{p}mlp.{x}_proj.weight"], bias(f"{p}mlp.{x}_proj.bias")) for x in ("gate", "up", "down")
        }
        return Mlp(self.spec, tensors[f"{p}post_attention_layernorm.weight"], weights)


class Embed:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def forward(self, hidden, batch: BatchInput) -> torch.Tensor:
        return self.weight[batch.token_ids]


def fuse(weights: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection for several that read the same input: weights stacked by output row,
    a missing bias taken as zeros (None when no projection has one)."""
    weight = torch.cat([w for w, _ in weights])
    if all(b is None for _, b in weights):
        return weight, None
    return weight, torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in weights])


class Attention:
    """Self-attention of one layer over the paged KV cache; q, k and v come from one fused projection.

    Invariant: q and k (and so the keys in the KV pool) hold each head's rotary dims
    interleaved (``interleave_rotary_rows``); every reader of this layer's pool uses that layout.
    """

    def __init__(self, spec: ModelSpec, rope: RopeSpec, layer: int, norm: torch.Tensor, weights: dict, kv_pool) -> None:
        self.spec, self.rope, self.layer, self.norm, self.kv_pool = spec, rope, layer, norm, kv_pool
        interleave = lambda t, heads: (
            None if t is None else interleave_rotary_rows(t, heads, spec.head_dim, rope.rotary_dim)
        )  # noqa: E731
        q, k = weights["q"], weights["k"]
        self.qkv = fuse(
            [
                (interleave(q[0], spec.num_heads), interleave(q[1], spec.num_heads)),
                (interleave(k[0], spec.num_kv_heads), interleave(k[1], spec.num_kv_heads)),
                weights["v"],
            ]
        )
        self.o = weights["o"]
        self.window = spec.sliding_windows[layer]
        self.scale = spec.attention_scales[layer]

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        spec = self.spec
        heads, kv_heads = spec.num_heads, spec.num_kv_heads
        x = rms_norm(hidden, self.norm, spec.norm_eps)
        qkv = linear(x, *self.qkv).view(x.shape[0], heads + 2 * kv_heads, spec.head_dim)
        table = batch.memo(
            "rope",
            lambda: rotation(*self.rope.cos_sin(batch.positions, torch.float32, batch.context_lens, batch.q_lens)),
        )
        qk = apply_rotary_interleaved(qkv[:, : heads + kv_heads], table)
        q, k, v = qk[:, :heads].contiguous(), qk[:, heads:], qkv[:, heads + kv_heads :]
        out = paged_attention(q, k, v, self.kv_pool, batch, self.scale, self.window)
        return hidden + linear(out, *self.o)


class Mlp:
    """Gated MLP of one layer; gate and up come from one fused projection."""

    def __init__(self, spec: ModelSpec, norm: torch.Tensor, weights: dict) -> None:
        self.spec, self.norm = spec, norm
        self.gate_up = fuse([weights["gate"], weights["up"]])
        self.down = weights["down"]
        self.act = activation(spec.hidden_act)

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        x = rms_norm(hidden, self.norm, self.spec.norm_eps)
        gate, up = linear(x, *self.gate_up).chunk(2, dim=-1)
        return hidden + linear(self.act(gate) * up, *self.down)


class Head:
    def __init__(self, norm: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self.norm, self.weight, self.eps = norm, weight, eps

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        return linear(rms_norm(hidden[batch.logits_indices], self.norm, self.eps), self.weight)
