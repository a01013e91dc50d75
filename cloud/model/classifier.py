"""The window classifiers edgeloop trains: what training, export and checkpoints accept."""

from __future__ import annotations

from cloud.model.cnn import WindowClassifier
from cloud.model.transformer import SensorTransformer

# Both: windows (B, T, C) → logits (B, K), a ``cfg`` dataclass with window, channels and
# n_classes that rebuilds them, and an ``exporter`` (cloud.model.export).
Classifier = WindowClassifier | SensorTransformer
