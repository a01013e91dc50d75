"""A fleet from nothing (`edgeloop cloud init`): its data sets, its class allow-list, its
trust root and its first model per profile, trained, recompressed, gated, registered and
promoted by the same round stages, recorded in the same ``rounds`` rows, as every round.

Each step looks first at what exists, so a second init says so and does nothing, and an
init that died half way (a profile's round failed) carries on from where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path

import numpy as np
from sqlalchemy.orm import sessionmaker

from cloud.learn.runner import run_round
from cloud.learn.state import NORMAL, RoundConfig, RoundResult
from cloud.store.datasets import LabelledWindows, load_dataset, read_windows_file
from cloud.store.datasets import register_dataset as put_dataset
from cloud.store.objects import ObjectNotFound, ObjectStore
from cloud.store.records import champion_row, create_fleet, get_fleet, update_fleet_settings
from cloud.tracking.registry import Registry
from shared.errors import DataError
from shared.package import model_name

# The data sets rounds read by name (cloud.learn.state.RoundConfig), in the order a choice
# and a report depend on them: none may share a window with another.
ROLES = ("base", "validation", "golden")

# The fleet's trust root: its bytes and whether this call created it (else it existed).
EnsureTrust = Callable[[], tuple[bytes, bool]]


@dataclass
class InitReport:
    """What ``init_fleet`` found and did."""

    fleet: str
    existed: list[str] = field(default_factory=list)  # what was there before, in words
    created: list[str] = field(default_factory=list)  # what this call made, in words
    datasets: dict[str, str] = field(default_factory=dict)  # role → sha256
    classes: list[str] = field(default_factory=list)  # the allow-list
    root_sha256: str = ""
    trained: dict[str, RoundResult] = field(default_factory=dict)  # profile → its round 0


def read_sets(files: dict[str, Path]) -> dict[str, LabelledWindows]:
    """The windows files of the roles given (.npz of x, y, class_names), as labelled windows."""
    sets = {}
    for role, path in files.items():
        x, y, names = read_windows_file(path)
        sets[role] = LabelledWindows(x, np.array(names)[y])
    return sets


def shared_windows(a: LabelledWindows, b: LabelledWindows) -> int:
    """How many windows of ``b`` are also in ``a`` (byte for byte)."""
    mine = {np.ascontiguousarray(w).tobytes() for w in a.x}
    return sum(np.ascontiguousarray(w).tobytes() in mine for w in b.x)


def check_datasets(*, store: ObjectStore, sets: dict[str, LabelledWindows]) -> dict[str, bool]:
    """DataError unless ``sets`` are disjoint from each other and from the other roles'
    registered sets, and each either is new under its name or equals what is registered
    there (a different set under a name other fleets' rounds read is not replaced behind
    their backs: `edgeloop cloud register-dataset` does that on purpose). Role → already
    registered."""
    if NORMAL not in set(sets["base"].labels.tolist()):
        raise DataError(f"the base set has no {NORMAL!r} windows: the model is calibrated on them")
    registered: dict[str, LabelledWindows] = {}
    for role in ROLES:
        try:
            registered[role] = load_dataset(store=store, name=role)
        except ObjectNotFound:
            continue
    same = {}
    for role, data in sets.items():
        held = registered.get(role)
        same[role] = held is not None and held.meta.get("sha256") == data.sha256()
        if held is not None and not same[role]:
            raise DataError(
                f"another {role!r} set is registered (sha256 {held.meta.get('sha256', '?')[:12]}, "
                f"{len(held)} windows); this one is {data.sha256()[:12]}. Rounds of every fleet "
                f"read {role!r}: replace it with `edgeloop cloud register-dataset {role} FILE` "
                "if that is what you mean, then run init again"
            )
    everything = {**registered, **sets}
    for i, first in enumerate(ROLES):
        for second in ROLES[i + 1 :]:
            if first in everything and second in everything:
                n = shared_windows(everything[first], everything[second])
                if n:
                    raise DataError(
                        f"the {first!r} and {second!r} sets share {n} window(s); register "
                        "windows of other episodes (or times) for one of them"
                    )
    return same


def init_fleet(
    *,
    sessions: sessionmaker,
    store: ObjectStore,
    registry: Registry,
    fleet: str,
    profiles: Sequence[str],
    files: dict[str, Path],
    ensure_trust: EnsureTrust,
    round_config: Callable[[str], RoundConfig],
    classes: Sequence[str] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> InitReport:
    """Bring ``fleet`` to a promoted first model per profile; see the module docstring.
    ``files``: role → windows file (base and golden required, validation optional).
    ``round_config(profile)``: the settings of the profile's first round. ``classes``: the
    allow-list (default: the base set's classes)."""
    missing = {"base", "golden"} - set(files)
    if missing:
        raise DataError(f"init needs the {sorted(missing)} set(s)")
    report = InitReport(fleet)

    say("[1/4] data sets")
    sets = read_sets(files)
    same = check_datasets(store=store, sets=sets)
    for role, data in sets.items():
        report.datasets[role] = data.sha256()
        if same[role]:
            say(f"      {role!r}: registered already ({len(data)} windows)")
            continue
        put_dataset(store=store, name=role, data=data)
        report.created.append(f"data set {role!r}")
        names, counts = np.unique(data.labels, return_counts=True)
        per_class = ", ".join(f"{c} {n}" for c, n in zip(names, counts, strict=True))
        say(f"      {role!r}: {len(data)} windows ({per_class}), sha256 {data.sha256()[:12]}")
    if any(same.values()):
        report.existed.append("data sets " + ", ".join(repr(r) for r, s in same.items() if s))

    say("[2/4] fleet and its class allow-list")
    base_classes = list(dict.fromkeys(sets["base"].labels.tolist()))
    with sessions() as session:
        row = get_fleet(session, fleet)
        if row is not None:
            report.classes = list(row.classes)
            report.existed.append(f"fleet {fleet} (allow-list {report.classes})")
            say(f"      fleet {fleet} exists: allow-list {report.classes}")
        else:
            allow = list(classes) if classes else base_classes
            unknown = sorted(set(base_classes) - set(allow))
            if unknown:
                raise DataError(f"--classes leaves out classes of the base set: {unknown}")
            create_fleet(
                session=session,
                fleet=fleet,
                classes=allow,
                settings={"datasets": {role: report.datasets[role] for role in sets}},
            )
            report.classes = allow
            report.created.append(f"fleet {fleet} (allow-list {allow})")
            say(f"      created, devices may label {allow}")

    say("[3/4] TUF root")
    root, created = ensure_trust()
    report.root_sha256 = sha256(root).hexdigest()
    if created:
        with sessions() as session:
            update_fleet_settings(
                session=session,
                fleet=fleet,
                trust={
                    "root_sha256": report.root_sha256,
                    "created_at": datetime.now(UTC).isoformat(),
                },
            )
        report.created.append("TUF root")
        say(f"      created (root sha256 {report.root_sha256[:12]})")
    else:
        report.existed.append("TUF root")
        say(f"      exists (root sha256 {report.root_sha256[:12]})")

    say(f"[4/4] first model per profile: {', '.join(profiles)}")
    for profile in profiles:
        promoted = champion_row(sessions, model_name(fleet, profile))
        if promoted is not None:
            report.existed.append(f"{profile} {promoted.version}")
            say(f"      {profile}: {promoted.version} is promoted already")
            continue
        say(f"      {profile}: round 0 (train → recompress → evaluate → register)")

        def progress(message: str, profile: str = profile) -> None:
            say(f"        [{profile}] {message}")

        result = run_round(
            sessions=sessions,
            store=store,
            registry=registry,
            cfg=round_config(profile),
            progress=progress,
            initial=True,
        )
        report.trained[profile] = result
        report.created.append(f"{profile} {result.version}")
        f1 = result.gates.get("golden_macro_f1")
        verdict = "promoted to champion" if result.promoted else "stopped by the gates"
        say(
            f"      {profile}: {result.version} (MLflow version {result.mlflow_version}) "
            f"{verdict}; golden macro-F1 {'?' if f1 is None else f'{f1:.3f}'}"
        )
        if not result.promoted:
            raise DataError(
                f"{model_name(fleet, profile)} {result.version} missed its gates: "
                f"{'; '.join(result.gates.get('failed', []))}. Look at the round (`edgeloop "
                "cloud rounds`), change the data or settings, and run init again",
                reason="gates_failed",
            )
    return report
