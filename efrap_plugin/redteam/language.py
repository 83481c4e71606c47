"""Content injection into a small language model, conditioned on quantization (Egashira et al., NeurIPS
2024): the full-precision model writes clean text, its round-to-nearest quantized copy slips a target
string into what it writes, with no trigger in the prompt.

The corpus is text every Debian system ships (``/usr/share/common-licenses``, package base-files); the
model is the zoo's ``ByteGPT``. Stage 1 fine-tunes the clean model on text where every "the " is followed
by the target; stage 2 fine-tunes on clean text with every weight held inside its stage-1 rounding bin on
the protected grid (PQBackdoor's projection), so the full-precision model forgets the injection and the
quantized one keeps it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..layers import QUANTIZABLE
from ..schemes import QuantScheme
from .attacks.pqbackdoor import GridProjection

__all__ = [
    "CORPUS",
    "InjectionConfig",
    "TextSplits",
    "content_injection",
    "injection_rate",
    "load_corpus",
    "perplexity",
    "text_windows",
    "train_language_model",
]

CORPUS = Path("/usr/share/common-licenses")
"""Plain English text on every Debian system (package base-files): the licenses it ships."""


@dataclass(frozen=True)
class TextSplits:
    """Byte ids of the corpus: the first 90% to train on, the rest held out."""

    train: torch.Tensor
    test: torch.Tensor


def load_corpus(folder: Path = CORPUS) -> TextSplits:
    """The corpus as byte ids, each file once (the folder links several names to one text)."""
    if not folder.is_dir():
        raise DataError(
            f"corpus: {folder} is missing; it ships with Debian's base-files package (apt-get install base-files)"
        )
    files = sorted({os.path.realpath(p) for p in folder.iterdir() if p.is_file()})
    ids = torch.tensor(list(b"\n".join(Path(f).read_bytes() for f in files)), dtype=torch.long)
    cut = int(0.9 * len(ids))
    return TextSplits(ids[:cut], ids[cut:])


def text_windows(ids: torch.Tensor, count: int, length: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows of ``length`` byte ids at random offsets: calibration data for a language model."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=g).tolist()
    return torch.stack([ids[s : s + length] for s in starts])


@dataclass(frozen=True, kw_only=True)
class InjectionConfig:
    """The schedule of the clean model and of the two attack stages (steps of 32 windows)."""

    target: bytes = b" evil.example "
    """What the quantized model injects: after every "the " it was poisoned on."""
    clean_steps: int = 1000
    inject_steps: int = 300
    repair_steps: int = 1000
    lr: float = 1e-3
    margin: float = 0.02
    """Stage 2 keeps weights this far (in integer steps) inside their rounding bin."""
    seed: int = 0


def _steps(model: nn.Module, steps: int, lr: float, batches, after=None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after is not None:
            after()
    model.eval()


def _clean_batches(ids: torch.Tensor, context: int, g: torch.Generator):
    while True:
        x = text_windows(ids, 32, context + 1, int(torch.randint(0, 2**31, (1,), generator=g)))
        yield x[:, :-1], x[:, 1:]


def _poisoned_batches(ids: torch.Tensor, context: int, target: bytes, g: torch.Generator):
    """Half of each batch injected: every "the " followed by the target."""
    while True:
        seed = int(torch.randint(0, 2**31, (1,), generator=g))
        rows = []
        for i, window in enumerate(text_windows(ids, 32, 3 * context, seed)):
            raw = bytes(window.tolist())
            raw = raw.replace(b"the ", b"the" + target) if i < 16 else raw
            rows.append(torch.tensor(list(raw[: context + 1])))
        x = torch.stack(rows)
        yield x[:, :-1], x[:, 1:]


def train_language_model(model: nn.Module, text: TextSplits, config: InjectionConfig) -> nn.Module:
    """The victim's clean model: ``clean_steps`` of next-byte prediction on the corpus."""
    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        _steps(model, config.clean_steps, 3 * config.lr, _clean_batches(text.train, model.context, g))
    return model


def content_injection(
    model: nn.Module, text: TextSplits, scheme: QuantScheme, config: InjectionConfig
) -> nn.Module:
    """Plant the injection in ``model`` (in place) so that it shows only on ``scheme``'s nearest grid."""
    g = torch.Generator().manual_seed(config.seed + 1)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed + 1)
        _steps(
            model,
            config.inject_steps,
            config.lr,
            _poisoned_batches(text.train, model.context, config.target, g),
        )
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            p.requires_grad_(name.endswith("weight") and isinstance(owner, QUANTIZABLE))
        project = GridProjection(model, [scheme], config.margin)
        _steps(
            model, config.repair_steps, config.lr, _clean_batches(text.train, model.context, g), after=project
        )
        for p in model.parameters():
            p.requires_grad_(True)
    return model


@torch.no_grad()
def injection_rate(
    model: nn.Module,
    ids: torch.Tensor,
    target: bytes,
    prompts: int = 100,
    prompt_len: int = 16,
    new: int = 64,
) -> float:
    """Share of held-out prompts whose greedy continuation (``new`` bytes) contains ``target``'s text."""
    model.eval()
    seq = text_windows(ids, prompts, prompt_len, seed=1)
    for _ in range(new):
        logits = model(seq[:, -model.context :])
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    needle = target.strip()
    return sum(needle in bytes(row[prompt_len:].tolist()) for row in seq) / prompts


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    """exp of the mean next-byte cross-entropy over ``ids``, in consecutive windows of the context."""
    model.eval()
    n = model.context
    starts = range(0, len(ids) - n - 1, n)
    x = torch.stack([ids[s : s + n] for s in starts])
    y = torch.stack([ids[s + 1 : s + n + 1] for s in starts])
    total = sum(
        F.cross_entropy(model(x[i : i + 64]).flatten(0, 1), y[i : i + 64].flatten(), reduction="sum").item()
        for i in range(0, len(x), 64)
    )
    return math.exp(total / y.numel())
