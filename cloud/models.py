"""Transformer window classifiers behind one spec: PatchTST and a tiny DeepSeek-V3 backbone.

Both take raw sensor windows (B, T, C) and return logits (B, K); both keep the training
data's channel mean/std as buffers, so the exported graph needs no preprocessing on a
device. A ``ModelSpec`` plus a state dict rebuilds any model, pruned ones included: pruning
shrinks the spec (layers, FFN width), never leaves ragged shapes behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3Model, PatchTSTConfig
from transformers import PatchTSTForClassification as _PatchTST

BACKBONES = ("patchtst", "deepseek")


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
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.window % self.patch:
            raise ValueError(f"window {self.window} is not a multiple of patch {self.patch}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.layers < 1:
            raise ValueError("a model needs at least one layer")


class DenseExperts(nn.Module):
    """DeepSeek-V3's routed experts, computed densely: every expert on every token, weighted
    by the router's top-k weights (zero for experts not chosen). Same parameters and the same
    result as transformers' sparse loop, but without data-dependent control flow, so a
    traced ONNX graph keeps every expert (the loop keeps only the experts its example
    input happened to hit) and each projection is one MatMul that quantizers understand.
    With a handful of tiny experts the dense form is also the faster one on a CPU."""

    def __init__(self, experts: int, d_model: int, width: int) -> None:
        super().__init__()
        self.num_experts, self.width = experts, width
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, d_model))
        self.down_proj = nn.Parameter(torch.empty(experts, d_model, width))
        self.act_fn = nn.SiLU()
        self.last_activation: torch.Tensor | None = None  # (E, I) mean routed |a|, recording
        self.record = False

    def forward(
        self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        e, (w, d) = self.num_experts, self.down_proj.shape[1:][::-1]  # static: constant-folds
        gate_up = hidden @ self.gate_up_proj.reshape(e * 2 * w, d).t()  # (N, E*2I)
        gate_up = gate_up.reshape(-1, e, 2 * w)
        act = self.act_fn(gate_up[..., :w]) * gate_up[..., w:]  # (N, E, I)
        route = torch.zeros(hidden.shape[0], e, dtype=hidden.dtype, device=hidden.device)
        route = route.scatter(1, top_k_index, top_k_weights.to(hidden.dtype))  # (N, E)
        if self.record:  # mean |a| over the tokens routed to each expert: what it really sees
            routed = (route > 0).to(act.dtype)  # (N, E)
            total = (act.detach().abs() * routed[..., None]).sum(0)  # (E, I)
            self.last_activation = total / routed.sum(0).clamp_min(1)[:, None]
        mixed = (act * route[..., None]).reshape(-1, e * w)  # (N, E*I)
        down = self.down_proj.permute(0, 2, 1).reshape(e * w, d)  # (E*I, D)
        return mixed @ down  # (N, D)


class SensorTransformer(nn.Module):
    """Windows (B, T, C) → logits (B, K) through the spec's transformer backbone."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        spec.check()
        self.cfg = spec
        self.register_buffer("mean", torch.zeros(spec.channels))
        self.register_buffer("std", torch.ones(spec.channels))
        if spec.backbone == "patchtst":
            self.net = _PatchTST(
                PatchTSTConfig(
                    num_input_channels=spec.channels,
                    context_length=spec.window,
                    patch_length=spec.patch,
                    patch_stride=spec.patch,
                    d_model=spec.d_model,
                    num_hidden_layers=spec.layers,
                    num_attention_heads=spec.heads,
                    ffn_dim=spec.ffn,
                    num_targets=spec.n_classes,
                    dropout=spec.dropout,
                    head_dropout=spec.dropout,
                    norm_type="layernorm",
                    scaling=None,  # the buffers above standardise with training statistics
                    use_cls_token=False,
                    pooling_type="mean",
                    positional_encoding_type="sincos",
                )
            )
        else:
            self.embed = nn.Linear(spec.patch * spec.channels, spec.d_model)  # patch tokens
            config = DeepseekV3Config(
                vocab_size=8,  # unused: the model is fed patch embeddings
                hidden_size=spec.d_model,
                intermediate_size=spec.ffn,
                moe_intermediate_size=spec.moe_ffn,
                num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads,
                num_key_value_heads=spec.heads,
                n_shared_experts=1,
                n_routed_experts=spec.experts,
                num_experts_per_tok=spec.experts_per_token,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=spec.dense_layers,
                kv_lora_rank=spec.kv_rank,
                q_lora_rank=spec.q_rank,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=spec.d_model // spec.heads,
                max_position_embeddings=max(64, spec.window // spec.patch),
                attention_dropout=0.0,
                use_cache=False,
            )
            config._attn_implementation = "eager"
            self.net = DeepseekV3Model(config)
            for layer in self.net.layers:
                if hasattr(layer.mlp, "experts"):
                    layer.mlp.experts = DenseExperts(spec.experts, spec.d_model, spec.moe_ffn)
            self.head = nn.Linear(spec.d_model, spec.n_classes)
            self.drop = nn.Dropout(spec.dropout)
            self._init_deepseek()

    @torch.no_grad()
    def _init_deepseek(self) -> None:
        for module in self.modules():
            if isinstance(module, DenseExperts):
                nn.init.normal_(module.gate_up_proj, std=0.02)
                nn.init.normal_(module.down_proj, std=0.02)
            elif isinstance(module, nn.Linear) and module is not self.embed:
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.net.layers:
            if hasattr(layer.mlp, "gate"):
                nn.init.normal_(layer.mlp.gate.weight, std=0.02)

    @property
    def layers(self) -> nn.ModuleList:
        """The backbone's blocks, in order: what layer pruning removes."""
        if self.cfg.backbone == "patchtst":
            return self.net.model.encoder.layers
        return self.net.layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std  # (B, T, C)
        if self.cfg.backbone == "patchtst":
            return self.net(past_values=z).prediction_logits  # (B, K)
        b, t, c = z.shape
        p = self.cfg.patch
        tokens = z.reshape(b, t // p, p * c)  # (B, P, p*C): one token per patch of time
        n = t // p
        # A 4-D additive mask of zeros: every patch attends to every other (a window is
        # classified whole, not generated left to right). Passing it also skips the causal
        # mask builder, whose packed-sequence check does not export to ONNX.
        mask = tokens.new_zeros(b, 1, n, n)
        h = self.net(inputs_embeds=self.embed(tokens), attention_mask=mask).last_hidden_state
        # h: (B, P, D)
        return self.head(self.drop(h.mean(dim=1)))  # (B, K)


def build(spec: ModelSpec, x_normal: np.ndarray | None = None) -> SensorTransformer:
    """A fresh model; with normal-operation windows, its input standardisation is set."""
    torch.manual_seed(0)
    model = SensorTransformer(spec)
    if x_normal is not None:
        flat = torch.as_tensor(x_normal.reshape(-1, spec.channels), dtype=torch.float32)
        model.mean.copy_(flat.mean(0))
        model.std.copy_(flat.std(0).clamp_min(1e-3))
    return model.eval()


# -- checkpoints: spec + tensors, never pickle -------------------------------------------------


def to_bytes(model: SensorTransformer, class_names: list[str]) -> bytes:
    meta = {"model_spec": json.dumps(asdict(model.cfg)), "class_names": json.dumps(class_names)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    return save_safetensors(state, metadata=meta)


def from_bytes(data: bytes) -> tuple[SensorTransformer, list[str]]:
    # safetensors holds tensors only: loading a checkpoint cannot run code.
    state = load_safetensors(data)
    n = int.from_bytes(data[:8], "little")
    meta: dict[str, Any] = json.loads(data[8 : 8 + n]).get("__metadata__", {})
    model = SensorTransformer(ModelSpec(**json.loads(meta["model_spec"])))
    model.load_state_dict(state)
    return model.eval(), json.loads(meta["class_names"])


def respec(model: SensorTransformer, **changes: Any) -> ModelSpec:
    return replace(model.cfg, **changes)
