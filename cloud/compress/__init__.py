"""Compression per class of device: hardware profiles, pruning, distillation, per-layer
quantization, the pipeline that picks a student, and its report."""
