"""The window classifier, its training and fine-tuning, and export to an edge package."""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from shared.package import InputSpec, Manifest, build_package, sha256_hex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    window: int = 32  # T
    channels: int = 53  # C
    n_classes: int = 2
    hidden: int = 48
    kernel: int = 5
    layers: int = 3
    dropout: float = 0.1


class WindowClassifier(nn.Module):
    """Windows (B, T, C) → logits (B, K): standardise, temporal convs, mean+std pooling.

    The channel mean/std of the training data are buffers, so the exported graph takes raw
    sensor values and a device needs no preprocessing code.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.zeros(cfg.channels))
        self.register_buffer("std", torch.ones(cfg.channels))
        blocks: list[nn.Module] = []
        width = cfg.channels
        for _ in range(cfg.layers):
            blocks += [
                nn.Conv1d(width, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2),
                nn.BatchNorm1d(cfg.hidden),
                nn.GELU(),
            ]
            width = cfg.hidden
        self.body = nn.Sequential(*blocks)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(2 * cfg.hidden + cfg.channels, cfg.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std  # (B, T, C)
        level = z.mean(dim=1)  # (B, C): where each channel sits relative to normal operation
        h = self.body(z.transpose(1, 2))  # (B, H, T)
        pooled = torch.cat([h.mean(dim=2), h.std(dim=2), level], dim=1)  # (B, 2H + C)
        return self.head(self.drop(pooled))  # (B, K)


@dataclass
class TrainConfig:
    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0


def build_model(cfg: ModelConfig, x_normal: np.ndarray | None = None) -> WindowClassifier:
    model = WindowClassifier(cfg)
    if x_normal is not None:
        flat = torch.as_tensor(x_normal.reshape(-1, cfg.channels), dtype=torch.float32)
        model.mean.copy_(flat.mean(0))
        model.std.copy_(flat.std(0).clamp_min(1e-3))
    return model


def extend_classes(model: nn.Module, n_classes: int) -> nn.Module:
    """The same model with room for new classes: every weight is kept, and the output rows
    of the old classes are kept as they were. Any model whose ``cfg`` dataclass has
    ``n_classes`` and rebuilds it (the CNN here, cloud.models' transformers)."""
    old = model.cfg.n_classes
    if n_classes < old:
        raise ValueError(f"cannot shrink the label space from {old} to {n_classes}")
    if n_classes == old:
        return model
    torch.manual_seed(n_classes)  # the new rows' initial weights, the same on every run
    bigger = type(model)(replace(model.cfg, n_classes=n_classes))
    state = bigger.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            target = state[key]
            if target.shape == value.shape:
                target.copy_(value)
            elif target.shape[1:] == value.shape[1:] and (target.shape[0], value.shape[0]) == (
                n_classes,
                old,
            ):
                target[:old] = value  # an output layer: the old classes' rows
            else:
                raise ValueError(
                    f"{key}: cannot grow {tuple(value.shape)} to {tuple(target.shape)}"
                )
    bigger.load_state_dict(state)
    return bigger


def balanced_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-class loss weights inverse to frequency (mean 1 over the classes present; labels
    below 0, unlabelled, are not counted)."""
    counts = torch.bincount(y[y >= 0], minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros_like(counts))
    return weights / weights[counts > 0].mean()


def one_cycle(model: nn.Module, n: int, cfg: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a one-cycle schedule over ``cfg.epochs`` passes of ``n`` windows."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * max(1, -(-n // cfg.batch_size))
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)


def train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *, on_epoch: Any = None
) -> nn.Module:
    """Class-balanced cross-entropy with AdamW and a cosine schedule; ``on_epoch(i, loss)``."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(weight=balanced_weights(yt, model.cfg.n_classes))
    opt, sched = one_cycle(model, len(xt), cfg)
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
    model.eval()
    return model


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [
        model(torch.as_tensor(x[i : i + batch], dtype=torch.float32)).numpy()
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(out).argmax(1)


SCORE_OUTPUTS = ("energy", "confidence", "distance", "features")


class EdgeGraph(nn.Module):
    """The graph a device runs: the classifier plus its anomaly scores, computed by ONNX
    Runtime in the same call instead of in Python on every window (see
    edge_agent.scoring for the same scores in numpy, used for packages without them).

    Outputs: logits (B, K); energy = -logsumexp(logits) (B,); confidence = max softmax
    (B,); distance (B,) = mean squared z-score of the window's channel means and spreads
    against normal operation, over the calibrated threshold (over 1: out of distribution);
    features (B, 2C) = those channel means and spreads, which the device's diversity rule
    compares.
    """

    def __init__(self, model: nn.Module, ood: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("f_mean", torch.tensor(ood["feature_mean"], dtype=torch.float32))
        self.register_buffer("f_std", torch.tensor(ood["feature_std"], dtype=torch.float32))
        self.threshold = float(ood["threshold"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.model(x)  # (B, K)
        lse = torch.logsumexp(logits, dim=1)  # (B,)
        confidence = torch.exp(logits.max(dim=1).values - lse)
        mean = x.mean(dim=1)  # (B, C)
        spread = torch.sqrt(((x - mean[:, None, :]) ** 2).mean(dim=1))  # (B, C), two-pass
        features = torch.cat([mean, spread], dim=1)  # (B, 2C)
        z = (features - self.f_mean) / self.f_std
        distance = (z * z).mean(dim=1) / self.threshold
        return logits, -lse, confidence, distance, features


def export_onnx(model: nn.Module, ood: dict[str, Any] | None = None) -> bytes:
    """ONNX bytes with a dynamic batch axis; with ``ood`` calibration the graph also
    outputs the anomaly scores (EdgeGraph). The TorchScript exporter gives stable bytes."""
    model.eval()
    module: nn.Module = model if ood is None else EdgeGraph(model, ood).eval()
    outputs = ["logits", *(SCORE_OUTPUTS if ood is not None else ())]
    dummy = torch.zeros(2, model.cfg.window, model.cfg.channels)
    if getattr(model.cfg, "backbone", None) == "patchtst":
        # PatchTST's positional encoding does not trace with the TorchScript exporter; the
        # dynamo exporter handles it and writes the same bytes for the same weights too.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # It logs a warning per torchvision op it cannot register; we need none of them.
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                module,
                (dummy,),
                input_names=["window"],
                output_names=outputs,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                opset_version=18,
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        assert program is not None
        return _scoped_names(program.model_proto).SerializeToString()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but it writes the same bytes for the same
        # weights (canonical packages) and it is the one that exports DeepSeek-V3 MoE.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (dummy,),
            buf,
            input_names=["window"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["window", *outputs]},
            opset_version=17,
            dynamo=False,
        )
    if getattr(model.cfg, "backbone", None) is None:
        return buf.getvalue()
    # The TorchScript graph of a transformer carries long chains of shape arithmetic;
    # onnxscript's optimizer folds about half of its nodes away (same outputs, same bytes
    # for the same input).
    from onnxscript import optimizer

    return optimizer.optimize(onnx.load_from_string(buf.getvalue())).SerializeToString()


def compact_names(graph: bytes) -> bytes:
    """The graph a device gets: nodes and intermediate values renamed n0…, v0… and doc
    strings dropped. Exporters name them after module paths (about 10% of a small
    transformer's bytes); inputs, outputs and weights keep their names, and the
    package's report keeps the layer-by-layer table."""
    proto = onnx.load_from_string(graph)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in proto.graph.node for a in n.attribute):  # fmt: skip
        raise ValueError("compact_names handles flat graphs only; this one has subgraphs")
    keep = {i.name for i in proto.graph.input} | {o.name for o in proto.graph.output}
    keep |= {t.name for t in proto.graph.initializer}
    rename: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        for j, name in enumerate(node.input):
            if name in rename:
                node.input[j] = rename[name]
        for j, name in enumerate(node.output):
            if name and name not in keep:
                rename[name] = node.output[j] = f"v{len(rename)}"
    del proto.graph.value_info[:]
    proto.doc_string = ""
    return proto.SerializeToString()


def _scoped_names(proto: Any) -> Any:
    """Name each node after the module it came from, as the TorchScript exporter does
    (/model/net/…/q_proj/node_MatMul_38), and drop the dynamo exporter's per-node metadata
    (scopes, stack traces): it doubled the graph's size and a device has no use for it."""
    import ast

    for node in proto.graph.node:
        scopes = next(
            (
                ast.literal_eval(p.value)
                for p in node.metadata_props
                if p.key.endswith("name_scopes")
            ),
            [],
        )
        module = scopes[-2] if len(scopes) >= 2 else ""
        if module:
            node.name = "/" + module.replace(".", "/") + "/" + node.name
        del node.metadata_props[:]
    return proto


def tensor_hashes(graph: bytes) -> dict[str, str]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(graph)
    return {
        t.name: sha256_hex(np.ascontiguousarray(numpy_helper.to_array(t)).tobytes())
        for t in proto.graph.initializer
    }


def window_features(x: np.ndarray) -> np.ndarray:
    """(N, T, C) → (N, 2C): each channel's level and spread over the window (float64, as
    the device computes them)."""
    x = x.astype(np.float64)
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)


def ood_calibration(x_normal: np.ndarray, quantile: float = 0.995) -> dict[str, Any]:
    """Statistics for the device's feature-distance score, from normal-operation windows.

    The score is the mean squared z-score of a window's features against normal operation
    (a Hotelling-style T² with a diagonal covariance); the threshold is its ``quantile`` on
    the normal windows, so about 0.5% of normal windows are flagged as out of distribution.
    Faults the model was never taught still move these features, which is how they get
    uploaded at all.
    """
    feats = window_features(x_normal).astype(np.float64)
    mean = feats.mean(axis=0)
    # Floor each spread at float32 resolution: a nearly constant channel must not turn a
    # rounding difference into an alarm.
    std = np.maximum(feats.std(axis=0), 1e-5 * np.abs(mean) + 1e-6)
    score = np.mean(((feats - mean) / std) ** 2, axis=1)
    return {
        "feature_mean": mean.round(6).tolist(),
        "feature_std": std.round(6).tolist(),
        "threshold": float(np.quantile(score, quantile)),
        "quantile": quantile,
    }


def package_model(
    model: nn.Module,
    *,
    name: str,
    version: str,
    parent: str | None,
    profile: str,
    class_names: list[str],
    metadata: dict[str, Any] | None = None,
    ood: dict[str, Any] | None = None,
) -> bytes:
    """The exact bytes a device will run: ONNX graph + manifest, canonical.

    ``ood``: calibration from ood_calibration(); the graph then computes the anomaly
    scores too, and the manifest keeps the calibration.
    """
    if len(class_names) != model.cfg.n_classes:
        raise ValueError(f"{len(class_names)} class names for a {model.cfg.n_classes}-class model")
    metadata = {**(metadata or {}), **({"ood": ood} if ood is not None else {})}
    return package_graph(
        export_onnx(model, ood),
        model,
        name=name,
        version=version,
        parent=parent,
        profile=profile,
        class_names=class_names,
        metadata=metadata,
    )


def package_graph(
    graph: bytes,
    model: nn.Module,
    *,
    name: str,
    version: str,
    parent: str | None,
    profile: str,
    class_names: list[str],
    metadata: dict[str, Any],
) -> bytes:
    """Package an exported (maybe quantized) graph of ``model``: compact names, manifest
    with every hash, canonical zip."""
    graph = compact_names(graph)
    manifest = Manifest(
        name=name,
        version=version,
        parent=parent,
        profile=profile,
        input=InputSpec(window=model.cfg.window, channels=model.cfg.channels),
        class_names=tuple(class_names),
        graph_sha256=sha256_hex(graph),
        tensor_sha256=tensor_hashes(graph),
        metadata={"model_config": asdict(model.cfg), **metadata},
    )
    return build_package(graph=graph, manifest=manifest)
