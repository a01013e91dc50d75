"""Training keeps the epoch that scores best on a validation set, never the last by
default: the weights it returns score what the best epoch scored."""

from __future__ import annotations

from cloud.model.cnn import ModelConfig, build_model
from cloud.model.configs import TrainConfig
from cloud.model.metrics import classification_metrics
from cloud.model.train import predict, train


def test_the_best_validation_epoch_is_kept(tep_small):
    import torch

    from sim.tep import generate
    from tests.conftest import TEP_CACHE

    data, _ = tep_small
    val = generate(classes=data.class_names, runs_per_class=1, seed=41, horizon_h=4.0,
                   cache_dir=TEP_CACHE, workers=2)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_classes=len(data.class_names)), data.x[data.y == 0])
    scores: list[float] = []
    cfg = TrainConfig(epochs=6, lr=3e-3)
    # Validation labels that disagree with training (each class called the next one): the
    # better the model learns, the worse it scores there, so the best epoch is not the last.
    wrong = (val.y + 1) % len(data.class_names)

    train(
        model, data.x, data.y, cfg, val=(val.x, wrong), on_validate=lambda e, f1: scores.append(f1)
    )

    kept = classification_metrics(wrong, predict(model, val.x), data.class_names).macro_f1
    assert len(scores) == cfg.epochs
    assert scores[-1] < max(scores)
    assert kept == max(scores)
