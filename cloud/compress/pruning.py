"""Structured pruning of a SensorTransformer: whole blocks by block influence (ShortGPT),
FFN channels by |activation| × outgoing-weight norm (Wanda-style), experts included.
Each returns a new model built from a smaller spec, so a pruned model rebuilds like any other."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cloud.model.backbones import DenseExperts
from cloud.model.transformer import SensorTransformer, respec


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_influence(model: SensorTransformer, x: np.ndarray, batch: int = 128) -> list[float]:
    """Per block, 1 − mean cosine similarity between its input and output hidden states
    (ShortGPT's block influence): near 0 means the block barely changes its input."""
    model.eval()
    sums = [0.0] * len(model.layers)
    count = [0] * len(model.layers)
    hooks = []
    for i, layer in enumerate(model.layers):

        def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = i) -> None:
            # PatchTST passes the hidden state by keyword, DeepSeek by position.
            a = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            b = _hidden(out)
            d = a.shape[-1]
            cos = F.cosine_similarity(a.reshape(-1, d), b.reshape(-1, d), dim=1)
            sums[i] += float((1 - cos).sum())
            count[i] += cos.numel()

        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        for s in range(0, len(x), batch):
            model(torch.as_tensor(x[s : s + batch]))
    finally:
        for h in hooks:
            h.remove()
    return [s / max(c, 1) for s, c in zip(sums, count, strict=True)]


def prune_layers(model: SensorTransformer, keep: list[int]) -> SensorTransformer:
    """A new model with only the blocks in ``keep`` (in order), weights copied."""
    keep = sorted(keep)
    n = len(model.layers)
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"cannot keep layers {keep} of {n}")
    new = SensorTransformer(respec(model, **model.backbone.pruned_spec(model.cfg, keep)))
    prefix = re.escape(model.backbone.blocks_path) + r"\.(\d+)\."
    renumber = {old: new_i for new_i, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        m = re.match(prefix, key)
        if m is None:
            state[key] = value
        elif int(m.group(1)) in renumber:
            state[key[: m.start(1)] + str(renumber[int(m.group(1))]) + key[m.end(1) :]] = value
    new.load_state_dict(state)
    return new.eval()


# -- FFN-channel pruning ---------------------------------------------------------------------


@dataclass
class FFNSite:
    path: str  # module path of the FFN
    kind: str  # "seq" (PatchTST ff), "mlp" (gate/up/down), "experts" (DenseExperts)
    score: torch.Tensor | None = None  # (I,) or (E, I)
    batches: int = 0


def _ffn_sites(model: SensorTransformer) -> list[FFNSite]:
    return [FFNSite(path, kind) for path, kind in model.backbone.ffn_sites(model)]


def _experts(model: nn.Module, site: FFNSite) -> DenseExperts:
    experts = model.get_submodule(site.path)
    assert isinstance(experts, DenseExperts), site.path
    return experts


def _down(model: nn.Module, site: FFNSite) -> nn.Linear:
    module = model.get_submodule(site.path)
    return module[3] if site.kind == "seq" else module.down_proj  # type: ignore[index,return-value]


@torch.no_grad()
def ffn_importance(model: SensorTransformer, x: np.ndarray, batch: int = 128) -> list[FFNSite]:
    """Per FFN channel: mean |activation| entering the down projection × the norm of its
    outgoing weights, over ``x``."""
    model.eval()
    sites = _ffn_sites(model)
    hooks = []
    for site in sites:
        if site.kind == "experts":
            _experts(model, site).record = True
            continue

        def hook(_m: nn.Module, args: tuple, site: FFNSite = site) -> None:
            a = args[0].abs().reshape(-1, args[0].shape[-1]).mean(0)
            site.score = a if site.score is None else site.score + a
            site.batches += 1

        hooks.append(_down(model, site).register_forward_pre_hook(hook))
    try:
        for s in range(0, len(x), batch):
            model(torch.as_tensor(x[s : s + batch]))
            for site in sites:
                if site.kind == "experts":
                    a = _experts(model, site).last_activation
                    assert a is not None  # recorded by the forward pass just run
                    site.score = a if site.score is None else site.score + a
                    site.batches += 1
    finally:
        for h in hooks:
            h.remove()
        for site in sites:
            if site.kind == "experts":
                _experts(model, site).record = False
    for site in sites:
        assert site.score is not None
        mean = site.score / site.batches
        if site.kind == "experts":
            w = _experts(model, site).down_proj  # (E, D, I)
            site.score = mean * w.norm(dim=1)  # (E, I)
        else:
            site.score = mean * _down(model, site).weight.norm(dim=0)  # (I,)
    return sites


def prune_ffn(
    model: SensorTransformer, sites: list[FFNSite], keep_share: float
) -> SensorTransformer:
    """A new model whose every FFN keeps its ``keep_share`` most important channels."""
    if keep_share >= 1.0:
        return copy.deepcopy(model)
    spec = model.cfg
    ffn = max(1, round(spec.ffn * keep_share))
    moe = max(1, round(spec.moe_ffn * keep_share))
    new = SensorTransformer(respec(model, ffn=ffn, moe_ffn=moe))
    state = dict(model.state_dict())
    for site in sites:
        assert site.score is not None
        width = moe if site.kind == "experts" or site.path.endswith("shared_experts") else ffn
        if site.kind == "experts":
            idx = site.score.topk(width, dim=1).indices.sort(dim=1).values  # (E, k)
            gu, down = state[f"{site.path}.gate_up_proj"], state[f"{site.path}.down_proj"]
            inner = gu.shape[1] // 2
            state[f"{site.path}.gate_up_proj"] = torch.stack(
                [torch.cat([gu[e, idx[e]], gu[e, inner + idx[e]]]) for e in range(len(idx))]
            )
            state[f"{site.path}.down_proj"] = torch.stack(
                [down[e][:, idx[e]] for e in range(len(idx))]
            )
            continue
        idx = site.score.topk(width).indices.sort().values
        p = site.path
        if site.kind == "seq":
            state[f"{p}.0.weight"] = state[f"{p}.0.weight"][idx]
            if f"{p}.0.bias" in state:
                state[f"{p}.0.bias"] = state[f"{p}.0.bias"][idx]
            state[f"{p}.3.weight"] = state[f"{p}.3.weight"][:, idx]
        else:
            state[f"{p}.gate_proj.weight"] = state[f"{p}.gate_proj.weight"][idx]
            state[f"{p}.up_proj.weight"] = state[f"{p}.up_proj.weight"][idx]
            state[f"{p}.down_proj.weight"] = state[f"{p}.down_proj.weight"][:, idx]
    new.load_state_dict(state)
    return new.eval()
