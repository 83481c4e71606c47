"""Quantization-conditioned backdoor attacks, for red-teaming a PTQ pipeline."""

from .base import Attack, AttackResult
from .compartifact import CompArtifact, CompArtifactConfig
from .pqbackdoor import GridProjection, PQBackdoor, PQBackdoorConfig
from .qu_anti_zation import QuAntiZation, QuAntiZationConfig

ATTACKS = {"qu-anti-zation": QuAntiZation, "compartifact": CompArtifact, "pqbackdoor": PQBackdoor}

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
]
