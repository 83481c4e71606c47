"""A small, seeded training loop shared by the zoo and the attacks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import LabeledData
from ..device import resolve_device
from ..errors import EFRAPError
from ..threads import forward_flops, threads_for

__all__ = ["cross_entropy_loss", "seeded", "train"]

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


_OPTIMIZERS: dict[str, Callable[[list, float, float], torch.optim.Optimizer]] = {
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch's global generators (dropout, initialisation) inside the block only: the caller's
    random state is restored after it."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


def _forward_flops_in_eval(model: nn.Module, x: torch.Tensor) -> float:
    """One input's forward multiply-adds, counted in eval mode (BatchNorm statistics untouched); every
    module's own mode restored after."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return forward_flops(model, x)
    finally:
        for m, mode in was_training.items():
            m.train(mode)


def train(
    model: nn.Module,
    data: LabeledData,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    optimizer: str = "adam",
    loss_fn: LossFn = cross_entropy_loss,
    after_step: Callable[[], None] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    cosine: bool = True,
    freeze_batchnorm: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Train ``model`` in place; ``after_step`` runs after every optimiser step (projections).

    ``optimizer``: "adam" or "sgd" (momentum 0.9). ``freeze_batchnorm`` keeps BatchNorm in eval mode so
    that running statistics do not move. ``device`` (e.g. "cuda") moves the model there for training and
    back to where it was after; batches are moved one at a time, so the data set stays in host memory.
    The caller's global random state is left as it was.
    """
    if optimizer not in _OPTIMIZERS:
        raise EFRAPError(f"train: optimizer expected one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
    home = next(model.parameters()).device
    target = resolve_device(device) if device is not None else home
    model.to(target)
    gen = torch.Generator().manual_seed(seed)
    opt = _OPTIMIZERS[optimizer]([p for p in model.parameters() if p.requires_grad], lr, weight_decay)
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if cosine else None
    flops = 3.0 * batch_size * _forward_flops_in_eval(model, data.x[:1].to(target))  # forward + backward
    model.train()
    if freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def step(idx: torch.Tensor) -> float:
        loss = loss_fn(model, data.x[idx].to(target), data.y[idx].to(target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if after_step is not None:
            after_step()
        return float(loss.detach()) * len(idx)

    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    with seeded(seed, target), threads_for(flops, target):
        for epoch in bar:
            perm = torch.randperm(len(data), generator=gen)
            total = sum(step(perm[i : i + batch_size]) for i in range(0, len(data), batch_size))
            bar.set_postfix(loss=f"{total / len(data):.4f}")
            log.debug("%s epoch %d loss %.4f", desc, epoch, total / len(data))
    model.eval()
    return model.to(home)
