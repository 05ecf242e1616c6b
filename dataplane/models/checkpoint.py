"""Reading a local Hugging Face checkpoint directory tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from common.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Maps tensor names to safetensors files and reads only the tensors asked for.

    Invariants: ``weight_map`` names every tensor of the checkpoint exactly once;
    ``tensors_read`` lists, in order, every tensor this reader has loaded, so a
    caller can prove that a stage touched nothing but its own weights.
    """

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.weight_map = self._build_weight_map()
        self.tensors_read: list[str] = []

    def _build_weight_map(self) -> dict[str, str]:
        index_file = self.model_dir / INDEX_FILE
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_file} is not a valid safetensors index: {exc}") from exc
            missing = {f for f in weight_map.values() if not (self.model_dir / f).is_file()}
            if missing:
                raise CheckpointError(f"{index_file} refers to missing shard files: {sorted(missing)}")
            return dict(weight_map)
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{str(self.model_dir)!r} holds no *.safetensors weights")
        weight_map: dict[str, str] = {}
        for file in files:
            for name in self._open(file.name).keys():
                weight_map[name] = file.name
        return weight_map

    def _open(self, file_name: str):
        path = self.model_dir / file_name
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises several unrelated types for corrupt files
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> list[int]:
        self._require([name])
        return list(self._open(self.weight_map[name]).get_slice(name).get_shape())

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        names = list(dict.fromkeys(names))
        self._require(names)
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file_name, file_names in by_file.items():
            handle = self._open(file_name)
            for name in file_names:
                try:
                    tensor = handle.get_tensor(name)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name!r} from {file_name}: {exc}") from exc
                tensors[name] = tensor.to(dtype) if dtype is not None else tensor
                self.tensors_read.append(name)
        return tensors

    def _require(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"checkpoint {str(self.model_dir)!r} lacks tensors {missing[:5]}")
