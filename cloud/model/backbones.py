"""The transformer backbones a SensorTransformer can have, each one object with the hooks
that building, pruning and export need. A new backbone is one more class here and one
entry in BACKBONES; nothing else names a backbone.

- ``build`` adds the backbone's modules to the model (same order every time: the
  initial weights depend on it);
- ``blocks_path`` is where its blocks live (layer pruning renumbers them);
- ``forward`` maps standardised windows (B, T, C) to logits (B, K);
- ``ffn_sites`` lists the FFNs channel pruning may shrink, with their kind;
- ``pruned_spec`` says how the spec changes when only some blocks are kept;
- ``exporter`` names the ONNX exporter that handles it (cloud.model.export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3Model, PatchTSTConfig
from transformers import PatchTSTForClassification as _PatchTST

if TYPE_CHECKING:
    from cloud.model.transformer import ModelSpec, SensorTransformer


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


class Backbone:
    name = ""
    blocks_path = ""
    exporter = "torchscript+optimize"

    def build(self, model: SensorTransformer, spec: ModelSpec) -> None:
        raise NotImplementedError

    def forward(self, model: SensorTransformer, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ffn_sites(self, model: SensorTransformer) -> list[tuple[str, str]]:
        """(module path, kind) of each FFN: kind ``seq`` (Linear, act, drop, Linear),
        ``mlp`` (gate/up/down projections) or ``experts`` (DenseExperts)."""
        raise NotImplementedError

    def pruned_spec(self, spec: ModelSpec, keep: list[int]) -> dict[str, Any]:
        return {"layers": len(keep)}


class PatchTST(Backbone):
    """PatchTST (channel-independent patches), transformers' classification model."""

    name = "patchtst"
    blocks_path = "net.model.encoder.layers"
    # Its positional encoding does not trace with the TorchScript exporter.
    exporter = "dynamo"

    def build(self, model: SensorTransformer, spec: ModelSpec) -> None:
        model.net = _PatchTST(
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
                # PatchTSTConfig has no `dropout`: this is kept as an attribute no layer reads,
                # so only head_dropout applies (left as it was by the restructure; see
                # docs/architecture.md).
                dropout=spec.dropout,  # type: ignore[call-arg]
                head_dropout=spec.dropout,
                norm_type="layernorm",
                scaling=None,  # the buffers above standardise with training statistics
                use_cls_token=False,
                pooling_type="mean",
                positional_encoding_type="sincos",
            )
        )

    def forward(self, model: SensorTransformer, z: torch.Tensor) -> torch.Tensor:
        return model.net(past_values=z).prediction_logits  # (B, K)

    def ffn_sites(self, model: SensorTransformer) -> list[tuple[str, str]]:
        return [(f"{self.blocks_path}.{i}.ff", "seq") for i in range(len(model.layers))]


class DeepSeekV3(Backbone):
    """A tiny DeepSeek-V3 (multi-head latent attention, a dense first block, then mixture
    of experts with a shared expert) fed one token per patch of time."""

    name = "deepseek"
    blocks_path = "net.layers"
    exporter = "torchscript+optimize"  # the dynamo exporter fails on it

    def build(self, model: SensorTransformer, spec: ModelSpec) -> None:
        model.embed = nn.Linear(spec.patch * spec.channels, spec.d_model)  # patch tokens
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
        model.net = DeepseekV3Model(config)
        for layer in model.net.layers:
            if hasattr(layer.mlp, "experts"):
                layer.mlp.experts = DenseExperts(spec.experts, spec.d_model, spec.moe_ffn)
        model.head = nn.Linear(spec.d_model, spec.n_classes)
        model.drop = nn.Dropout(spec.dropout)
        _init(model)

    def forward(self, model: SensorTransformer, z: torch.Tensor) -> torch.Tensor:
        b, t, c = z.shape
        p = model.cfg.patch
        tokens = z.reshape(b, t // p, p * c)  # (B, P, p*C): one token per patch of time
        n = t // p
        # A 4-D additive mask of zeros: every patch attends to every other (a window is
        # classified whole, not generated left to right). Passing it also skips the causal
        # mask builder, whose packed-sequence check does not export to ONNX.
        mask = tokens.new_zeros(b, 1, n, n)
        h = model.net(inputs_embeds=model.embed(tokens), attention_mask=mask).last_hidden_state
        # h: (B, P, D)
        return model.head(model.drop(h.mean(dim=1)))  # (B, K)

    def ffn_sites(self, model: SensorTransformer) -> list[tuple[str, str]]:
        sites = []
        for i, layer in enumerate(model.layers):
            if isinstance(getattr(layer.mlp, "experts", None), DenseExperts):
                sites.append((f"{self.blocks_path}.{i}.mlp.experts", "experts"))
                sites.append((f"{self.blocks_path}.{i}.mlp.shared_experts", "mlp"))
            else:
                sites.append((f"{self.blocks_path}.{i}.mlp", "mlp"))
        return sites

    def pruned_spec(self, spec: ModelSpec, keep: list[int]) -> dict[str, Any]:
        return {"layers": len(keep), "dense_layers": sum(i < spec.dense_layers for i in keep)}


@torch.no_grad()
def _init(model: SensorTransformer) -> None:
    for module in model.modules():
        if isinstance(module, DenseExperts):
            nn.init.normal_(module.gate_up_proj, std=0.02)
            nn.init.normal_(module.down_proj, std=0.02)
        elif isinstance(module, nn.Linear) and module is not model.embed:
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for layer in model.layers:
        if hasattr(layer.mlp, "gate"):
            nn.init.normal_(layer.mlp.gate.weight, std=0.02)  # type: ignore[union-attr,arg-type]


BACKBONES: dict[str, Backbone] = {b.name: b for b in (PatchTST(), DeepSeekV3())}
