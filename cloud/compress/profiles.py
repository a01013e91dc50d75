"""Hardware profiles as data: per device class, its budgets and how to quantize for it."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cloud.compress.quantization import SCHEMES
from shared.errors import ConfigError

PROFILES_FILE = Path(__file__).with_name("profiles.toml")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    threads: int = 1
    max_package_kb: float = 1024
    max_latency_ms: float = 10.0
    max_memory_mb: float = 200
    max_f1_drop_pts: float = 1.0
    attention: str = "int8"
    ffn: str = "int8"
    other: str = "fp32"
    students: tuple[tuple[int, float], ...] = ((2, 0.5),)
    description: str = ""

    def check(self) -> None:
        for role in ("attention", "ffn", "other"):
            if getattr(self, role) not in SCHEMES:
                raise ConfigError(
                    f"profile {self.name!r}: {role} = {getattr(self, role)!r}; use one of {SCHEMES}"
                )
        if self.threads < 1:
            raise ConfigError(f"profile {self.name!r}: threads must be at least 1")
        if not self.students:
            raise ConfigError(f"profile {self.name!r}: list at least one student setting")
        for layers, ffn_keep in self.students:
            if layers < 1 or not 0 < ffn_keep <= 1:
                raise ConfigError(
                    f"profile {self.name!r}: student [{layers}, {ffn_keep}] needs layers ≥ 1 "
                    "and an FFN share in (0, 1]"
                )

    @property
    def schemes(self) -> dict[str, str]:
        return {"attention": self.attention, "ffn": self.ffn, "other": self.other}


def load_profiles(path: Path | None = None) -> dict[str, HardwareProfile]:
    """Every profile in ``path`` (default: the shipped profiles.toml), checked."""
    path = path or PROFILES_FILE
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read hardware profiles from {path}: {exc}") from exc
    out = {}
    for name, body in raw.items():
        fields = {k: v for k, v in body.items() if k in HardwareProfile.__dataclass_fields__}
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise ConfigError(f"profile {name!r} in {path}: unknown keys {unknown}")
        fields["students"] = tuple((int(a), float(b)) for a, b in fields.get("students", ()))
        profile = HardwareProfile(name=name, **fields)
        profile.check()
        out[name] = profile
    return out


def get_profile(name: str, path: Path | None = None) -> HardwareProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(f"unknown hardware profile {name!r}; known: {sorted(profiles)}")
    return profiles[name]
