"""Units of GPT-2: LayerNorm, learned positions, Conv1D weights ([in, out]), tied head."""

from __future__ import annotations

import torch

from common.model.spec import ModelSpec
from common.model.units import unit_layer
from dataplane.models.attention import paged_attention
from dataplane.models.batch import BatchInput
from dataplane.models.layers import activation, layer_norm, linear


class Gpt2Adapter:
    """Maps GPT-2 units to checkpoint tensors (with or without the ``transformer.`` prefix).

    Invariants: ``tensor_names(unit)`` lists exactly the tensors ``build(unit, ...)`` reads; Conv1D weights
    are transposed once at build time so every unit runs ``F.linear``; the head is ``lm_head.weight`` when
    the checkpoint has it or embeddings are untied, else ``wte``.
    """

    def __init__(self, spec: ModelSpec, available: set[str]) -> None:
        self.spec = spec
        self.available = available
        self.prefix = "transformer." if "transformer.wte.weight" in available else ""

    def tensor_names(self, unit: str) -> list[str]:
        p = self.prefix
        if unit == "embed":
            return [f"{p}wte.weight", f"{p}wpe.weight"]
        if unit == "head":
            untied = "lm_head.weight" in self.available or not self.spec.tie_word_embeddings
            head = "lm_head.weight" if untied else f"{p}wte.weight"
            return [f"{p}ln_f.weight", f"{p}ln_f.bias", head]
        h = f"{p}h.{unit_layer(unit)}."
        if unit.endswith(".attn"):
            parts = ["ln_1", "attn.c_attn", "attn.c_proj"]
        else:
            parts = ["ln_2", "mlp.c_fc", "mlp.c_proj"]
        return [f"{h}{part}.{kind}" for part in parts for kind in ("weight", "bias")]

    def build(self, unit: str, tensors: dict[str, torch.Tensor], kv_pool: torch.Tensor | None = None):
        values = [tensors[n] for n in self.tensor_names(unit)]
        if unit == "embed":
            return Embed(*values)
        if unit == "head":
            return Head(*values, eps=self.spec.norm_eps)
        ln_w, ln_b, w1, b1, w2, b2 = values
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
        if unit.endswith(".attn"):
            return Attention(self.spec, unit_layer(unit), (ln_w, ln_b), (w1, b1), (w2, b2), kv_pool)
        return Mlp(self.spec, (ln_w, ln_b), (w1, b1), (w2, b2))


class Embed:
    def __init__(self, wte: torch.Tensor, wpe: torch.Tensor) -> None:
        self.wte, self.wpe = wte, wpe

    def forward(self, hidden, batch: BatchInput) -> torch.Tensor:
        return self.wte[batch.token_ids] + self.wpe[batch.positions]


class Attention:
    """One layer's attention; ``spec.attention_scales[layer]`` carries ``scale_attn_weights`` and
    ``scale_attn_by_inverse_layer_idx``, ``spec.attention_upcast`` (``reorder_and_upcast_attn``) runs the
    scores and softmax in float32 whatever the model dtype."""

    def __init__(self, spec: ModelSpec, layer: int, norm, qkv, proj, kv_pool) -> None:
        self.spec, self.norm, self.qkv, self.proj, self.kv_pool = spec, norm, qkv, proj, kv_pool
        self.scale = spec.attention_scales[layer]
        self.upcast = spec.attention_upcast

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        spec = self.spec
        x = layer_norm(hidden, *self.norm, spec.norm_eps)
        q, k, v = linear(x, *self.qkv).view(x.shape[0], 3, spec.num_heads, spec.head_dim).unbind(1)
        if self.upcast and q.dtype != torch.float32:
            out = paged_attention(q.float(), k, v, self.kv_pool, batch, self.scale).to(q.dtype)
        else:
            out = paged_attention(q, k, v, self.kv_pool, batch, self.scale)
        return hidden + linear(out, *self.proj)


class Mlp:
    def __init__(self, spec: ModelSpec, norm, fc, proj) -> None:
        self.spec, self.norm, self.fc, self.proj = spec, norm, fc, proj
        self.act = activation(spec.hidden_act)

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        x = layer_norm(hidden, *self.norm, self.spec.norm_eps)
        return hidden + linear(self.act(linear(x, *self.fc)), *self.proj)


class Head:
    def __init__(self, norm_w: torch.Tensor, norm_b: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
        self.norm_w, self.norm_b, self.weight, self.eps = norm_w, norm_b, weight, eps

    def forward(self, hidden: torch.Tensor, batch: BatchInput) -> torch.Tensor:
        x = layer_norm(hidden[batch.logits_indices], self.norm_w, self.norm_b, self.eps)
        return linear(x, self.weight)
