"""What a learning round is made of: its settings, the services its stages use, and what
each stage hands on to the next (typed: the keys four stages, the summary and the CLI
read). Nothing here imports torch: the CLI reads rounds through it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NotRequired, TypedDict

from sqlalchemy.orm import sessionmaker

from cloud.config import CloudSettings
from cloud.learn.split import SplitConfig
from cloud.model.configs import TrainConfig
from cloud.store.objects import ObjectStore
from cloud.tracking.registry import Registry

NORMAL = "normal"  # class index 0 of every model: what the plant does when nothing is wrong
STAGES = ("train", "recompress", "evaluate", "register")


def _setting(name: str) -> Any:
    """The default of a round setting is the cloud's (one place: cloud.config)."""
    return CloudSettings.model_fields[name].default


@dataclass
class RoundConfig:
    fleet: str
    profile: str = "cpu-fp32"
    base_dataset: str = "base"  # the registered history the first replay buffer holds
    # Registered sets of other episodes than base: validation chooses (the training's best
    # epoch, the compression pipeline's student), golden only judges and reports. None, or
    # not registered: training keeps its last epoch, and a compressing profile refuses.
    validation_dataset: str | None = "validation"
    golden_dataset: str = "golden"
    replay_per_class: int = _setting("round_replay_per_class")
    # The new labelled uploads are split by device and time block (cloud.learn.split):
    # these shares of (device, block)s are held out for the gates and for validation.
    holdout_fraction: float = 0.25
    validation_fraction: float = 0.15
    holdout_block_s: float = 3600.0
    window_s: float = 1152.0  # what one window spans: the gap kept between the sides
    # The gates equal the product's goals (cloud.config; per fleet: round_gates_by_fleet).
    max_old_f1_drop_pts: float = _setting("round_max_old_f1_drop_pts")
    # Share of the golden set's fault windows (of any fault, known or not) that the model
    # flags as not normal: a missed alarm is the costliest error in a plant.
    max_detection_drop_pts: float = _setting("round_max_detection_drop_pts")
    min_new_recall: float = _setting("round_min_new_recall")
    # None: no pseudo-labels. Else unlabelled uploads the teacher classifies with at least
    # this softmax probability are labelled by it (source "teacher") before training.
    pseudo_label_min_confidence: float | None = _setting("round_pseudo_label_min_confidence")
    # The most new labelled windows a round loads (a class-balanced sample past it).
    max_windows: int = _setting("round_max_windows")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=_setting("round_epochs"), lr=2e-3)
    )
    distill_epochs: int = _setting("round_distill_epochs")  # student recovery (compression)
    delta_friendly: bool = _setting("round_delta_friendly")  # cloud.learn.close
    close_tolerance_pts: float = _setting("round_close_tolerance_pts")
    # The initial round's teacher: None for the CNN, else cloud.model.transformer.ModelSpec
    # fields (a transformer, which the compression pipeline can prune).
    teacher: dict[str, Any] | None = None
    seed: int = 0

    @property
    def split(self) -> SplitConfig:
        return SplitConfig(
            holdout_fraction=self.holdout_fraction,
            validation_fraction=self.validation_fraction,
            block_s=self.holdout_block_s,
            window_s=self.window_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoundConfig:
        raw = dict(raw)  # a row written before settings were kept has none: defaults
        if "train" in raw:
            raw["train"] = TrainConfig(**raw["train"])
        return cls(**raw)

    @classmethod
    def from_settings(cls, settings: CloudSettings, *, fleet: str, profile: str) -> RoundConfig:
        """What a round started now by a worker runs with (EDGELOOP_ROUND_*)."""
        gates = {
            "min_new_recall": settings.round_min_new_recall,
            "max_old_f1_drop_pts": settings.round_max_old_f1_drop_pts,
            "max_detection_drop_pts": settings.round_max_detection_drop_pts,
            **settings.round_gates_by_fleet.get(fleet, {}),
        }
        return cls(
            fleet=fleet,
            profile=profile,
            min_new_recall=gates["min_new_recall"],
            max_old_f1_drop_pts=gates["max_old_f1_drop_pts"],
            max_detection_drop_pts=gates["max_detection_drop_pts"],
            replay_per_class=settings.round_replay_per_class,
            pseudo_label_min_confidence=settings.round_pseudo_label_min_confidence,
            max_windows=settings.round_max_windows,
            train=TrainConfig(epochs=settings.round_epochs, lr=2e-3),
            distill_epochs=settings.round_distill_epochs,
        )


@dataclass
class Services:
    sessions: sessionmaker
    store: ObjectStore
    registry: Registry


# -- what each stage hands on (kept as JSON in the rounds table) ------------------------------


class TrainOutput(TypedDict):
    parent: str | None
    class_names: list[str]
    new_classes: list[str]
    label_watermark: int | None
    history: list[float]  # loss per epoch
    val_f1: NotRequired[list[float]]  # validation macro-F1 per epoch (the best one is kept)
    samples_used: int
    # [sample id, the label learnt]: later stages read these, never the labels table,
    # which may have changed since
    fit: list[list[str]]
    validation: NotRequired[list[list[str]]]  # the round's uploads kept for choices
    holdout: list[list[str]]
    replay: list[list[str]]  # [replay key, class]
    whole_base: NotRequired[bool]  # the initial round: it learnt the whole base data set
    lineage: dict[str, Any]


class RecompressOutput(TypedDict):
    package_key: str
    sha256: str
    bytes: int
    compression: dict[str, Any] | None  # the pipeline's summary (None: shipped as it is)


class EvaluateOutput(TypedDict):
    metrics: dict[str, float]
    gates: dict[str, Any]  # GateReport.as_dict()
    confusion: list[list[int]]
    class_names: list[str]


class RegisterOutput(TypedDict):
    mlflow_version: str
    promoted: bool


class StageOutputs(TypedDict, total=False):
    train: TrainOutput
    recompress: RecompressOutput
    evaluate: EvaluateOutput
    register: RegisterOutput


@dataclass
class RoundState:
    """What a stage knows of its round: who, its settings, the outputs of earlier stages."""

    id: int
    fleet: str
    profile: str
    version: str
    initial: bool
    cfg: RoundConfig
    outputs: StageOutputs


@dataclass
class RoundResult:
    version: str
    parent: str | None
    class_names: list[str]
    new_classes: list[str]
    samples_used: int
    gates: dict[str, Any]
    promoted: bool
    package: bytes
    mlflow_version: str
    seconds: float


def summary(st: RoundState) -> dict[str, Any]:
    """A finished round's answer, from its stages' outputs."""
    out = st.outputs
    trained, evaluated, registered = out["train"], out["evaluate"], out["register"]
    return {
        "version": st.version,
        "parent": trained["parent"],
        "class_names": trained["class_names"],
        "new_classes": trained["new_classes"],
        "samples_used": trained["samples_used"],
        "gates": evaluated["gates"],
        "promoted": registered["promoted"],
        "mlflow_version": registered["mlflow_version"],
        "package_key": out["recompress"]["package_key"],
    }
