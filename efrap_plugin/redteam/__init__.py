"""The red-team kit: plant quantization-conditioned backdoors, train and evaluate the models they hide in.

``efrap_plugin.redteam.attacks`` (PQBackdoor, CompArtifact, Qu-ANTI-zation: ``run_attack``), the trigger
(``PatchTrigger``), the model zoo (``build_model``, saved and loaded with ``save_model`` / ``load_model``),
the offline datasets (``load_dataset``: digits, Fashion-MNIST; CIFAR-10 from a local copy) and the
measurements a defense is judged by (``evaluate``: clean accuracy, attack success, their intervals).
The defense itself (``efrap_plugin``) never imports this package.
"""

from .checkpoint import load_model, save_model
from .cifar import load_cifar10
from .datasets import DATASETS, FASHION_MNIST_DIR, Splits, load_dataset, load_digits, load_fashion_mnist
from .evaluate import (
    ATTACK_BARS,
    REMOVAL_BARS,
    Metrics,
    Outcomes,
    as_predictor,
    asr,
    attack_fires,
    backdoor_removed,
    clean_acc,
    compare,
    der,
    evaluate,
    intervals,
    outcomes,
    paired_change,
    predict,
    ra,
    wilson_interval,
)
from .models import DigitsCNN, ResNet, TokenEncoder, build_model, resnet8, resnet20
from .training import cross_entropy_loss, seeded, train
from .triggers import PatchTrigger

__all__ = [
    "ATTACK_BARS",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "REMOVAL_BARS",
    "DigitsCNN",
    "Metrics",
    "Outcomes",
    "PatchTrigger",
    "ResNet",
    "Splits",
    "TokenEncoder",
    "as_predictor",
    "asr",
    "attack_fires",
    "backdoor_removed",
    "build_model",
    "clean_acc",
    "compare",
    "cross_entropy_loss",
    "der",
    "evaluate",
    "intervals",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_model",
    "outcomes",
    "paired_change",
    "predict",
    "ra",
    "resnet20",
    "resnet8",
    "save_model",
    "seeded",
    "train",
    "wilson_interval",
]
