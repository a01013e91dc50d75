"""Transformer window classifiers behind one spec, with a backbone from cloud.model.backbones.

Both take raw sensor windows (B, T, C) and return logits (B, K); both keep the training
data's channel mean/std as buffers, so the exported graph needs no preprocessing on a
device. A ``ModelSpec`` plus a state dict rebuilds any model, pruned ones included: pruning
shrinks the spec (layers, FFN width), never leaves ragged shapes behind.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cloud.model.backbones import BACKBONES, Backbone
from cloud.model.standardise import fit_input_stats, standardise


@dataclass(frozen=True)
class ModelSpec:
    backbone: str = "patchtst"  # one of BACKBONES
    window: int = 32  # T
    channels: int = 53  # C
    n_classes: int = 2  # K
    patch: int = 8  # time steps per patch token
    d_model: int = 64
    layers: int = 4
    heads: int = 4
    ffn: int = 128  # FFN width (the dense FFN for DeepSeek)
    dropout: float = 0.1
    # DeepSeek-V3 only: mixture of experts and multi-head latent attention
    experts: int = 4
    experts_per_token: int = 2
    moe_ffn: int = 32  # width of each routed expert (and of the shared expert)
    dense_layers: int = 1  # the first layers keep a dense FFN, as in DeepSeek-V3
    kv_rank: int = 16
    q_rank: int = 32

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; choose one of {tuple(BACKBONES)}"
            )
        if self.window % self.patch:
            raise ValueError(f"window {self.window} is not a multiple of patch {self.patch}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.layers < 1:
            raise ValueError("a model needs at least one layer")


class SensorTransformer(nn.Module):
    """Windows (B, T, C) → logits (B, K) through the spec's transformer backbone."""

    mean: torch.Tensor  # (C,) buffers: the training data's channel statistics
    std: torch.Tensor
    # Set by the backbone's build(): PatchTST has ``net``; DeepSeek-V3 all four.
    net: nn.Module
    embed: nn.Linear
    head: nn.Linear
    drop: nn.Dropout

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        spec.check()
        self.cfg = spec
        self.backbone: Backbone = BACKBONES[spec.backbone]
        self.register_buffer("mean", torch.zeros(spec.channels))
        self.register_buffer("std", torch.ones(spec.channels))
        self.backbone.build(self, spec)

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks, in order: what layer pruning removes."""
        return self.get_submodule(self.backbone.blocks_path)  # type: ignore[return-value]

    @property
    def exporter(self) -> str:
        return self.backbone.exporter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = standardise(x, self.mean, self.std)  # (B, T, C), clipped to ±CLIP_SIGMA
        return self.backbone.forward(self, z)


def build(spec: ModelSpec, x_normal: np.ndarray | None = None) -> SensorTransformer:
    """A fresh model; with normal-operation windows, its input standardisation is set."""
    torch.manual_seed(0)
    model = SensorTransformer(spec)
    if x_normal is not None:
        fit_input_stats(model, x_normal, spec.channels)
    return model.eval()


def respec(model: SensorTransformer, **changes: Any) -> ModelSpec:
    return replace(model.cfg, **changes)
