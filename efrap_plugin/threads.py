"""One CPU thread for small work: EFRAP's per-layer steps and small-model training.

A digits layer or a small CNN's batch gains nothing from a second intra-op thread, and on a shared
machine (other processes on the cores) torch's threads wait on each other. Beside two busy processes on
2 cores, the digits fixture's defense took 12.6 s at 2 threads and 8.9 s at 1, a short training 3.2 s
and 1.8 s; idle, the same within noise (benchmarks/results/threads.md). Large work keeps the caller's
thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["SMALL_WORK_FLOPS", "forward_flops", "threads_for"]

SMALL_WORK_FLOPS = 1e9
"""Per-step floating-point operations under which one thread is used (a ResNet-18 CIFAR layer's step
at batch 32 is several times more)."""


@contextlib.contextmanager
def threads_for(flops: float, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block on one CPU thread when a step costs under ``SMALL_WORK_FLOPS``; restore after."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    before = torch.get_num_threads()
    if not on_cpu or flops >= SMALL_WORK_FLOPS or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def forward_flops(model: nn.Module, sample: torch.Tensor) -> float:
    """Multiply-adds x 2 of one forward pass on ``sample`` through the Conv / Linear layers."""
    total = 0.0

    def count(module: nn.Module, _inp, out) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += 2.0 * out.numel() * module.weight[0].numel()  # each output: one row of the weight

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return total
