"""Checkpoints: what rebuilds a model (its config or spec) and its tensors, as safetensors.
Never pickle: loading a checkpoint cannot run code."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from cloud.model.classifier import Classifier
from cloud.model.cnn import ModelConfig, WindowClassifier
from cloud.model.transformer import ModelSpec, SensorTransformer


def to_bytes(model: nn.Module, class_names: list[str]) -> bytes:
    """A CNN keeps its ``model_config``, a transformer its ``model_spec``."""
    if isinstance(model, SensorTransformer):
        meta = {"model_spec": json.dumps(asdict(model.cfg)), "class_names": json.dumps(class_names)}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        return save_safetensors(state, metadata=meta)
    if isinstance(model, WindowClassifier):
        meta = {
            "model_config": json.dumps(asdict(model.cfg)),
            "class_names": json.dumps(class_names),
        }
        return save_safetensors(model.state_dict(), metadata=meta)
    raise TypeError(f"no checkpoint format for {type(model).__name__}")


def from_bytes(data: bytes) -> tuple[Classifier, list[str]]:
    """The model (in eval mode) and its class names."""
    state = load_safetensors(data)
    n = int.from_bytes(data[:8], "little")
    meta: dict[str, Any] = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    model: Classifier
    if "model_spec" in meta:
        model = SensorTransformer(ModelSpec(**json.loads(meta["model_spec"])))
    else:
        model = WindowClassifier(ModelConfig(**json.loads(meta["model_config"])))
    model.load_state_dict(state)
    return model.eval(), json.loads(meta["class_names"])
