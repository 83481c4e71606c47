"""Quantization-conditioned backdoor attacks, for red-teaming a PTQ pipeline."""

from .base import Attack, AttackResult
from .compartifact import CompArtifact, CompArtifactConfig
from .pqbackdoor import GridProjection, PQBackdoor, PQBackdoorConfig
from .qu_anti_zation import QuAntiZation, QuAntiZationConfig
from .runner import (
    ATTACKS,
    default_arch,
    default_config,
    default_trigger,
    red_team_model,
    run_attack,
    train_clean,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "CompArtifact",
    "CompArtifactConfig",
    "GridProjection",
    "PQBackdoor",
    "PQBackdoorConfig",
    "QuAntiZation",
    "QuAntiZationConfig",
    "default_arch",
    "default_config",
    "default_trigger",
    "red_team_model",
    "run_attack",
    "train_clean",
]
