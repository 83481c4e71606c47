"""Post-training static quantization in torch.ao's eager mode, as its tutorial writes it (QuantStub /
DeQuantStub, BatchNorm, a FloatFunctional residual add, fuse_modules, prepare / calibrate / convert),
plus EFRAP: the lines marked `# EFRAP` are all it adds.

    python examples/torch_ao_eager.py --json [--efrap '{"budget": 0.5}']

It red-teams the pipeline first: the tutorial model is trained on digits and a PQBackdoor is planted,
aimed at the grid the x86 qconfig's weight observer rounds to. Every figure is measured on the real
converted int8 model (torch.ao quantized kernels).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
from _flags import parse_flags
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, get_default_qconfig, prepare

from efrap_plugin import EFRAPConfig
from efrap_plugin.redteam import compare, load_digits, train
from efrap_plugin.redteam.attacks import PQBackdoor, default_trigger
from efrap_torchao import defend_prepared, observer_scheme, verify_eager  # EFRAP


class TutorialNet(nn.Module):
    """The shape of torch's static quantization tutorial model (stubs, Conv-BN-ReLU blocks, a residual
    add through FloatFunctional, a Linear head), sized for 8x8 digits."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.conv2, self.bn2, self.relu2 = (
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.skip = nn.quantized.FloatFunctional()
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.bn3, self.relu3 = (
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(self.quant(x))))
        x = self.pool(self.skip.add(x, self.relu2(self.bn2(self.conv2(x)))))
        return self.dequant(self.head(self.relu3(self.bn3(self.conv3(x)))))

    def fuse(self) -> TutorialNet:
        return fuse_modules(self, [[f"conv{i}", f"bn{i}", f"relu{i}"] for i in (1, 2, 3)])


def ptq(model: TutorialNet, calib: torch.Tensor, efrap: EFRAPConfig | None):
    model = copy.deepcopy(model).eval().fuse()
    model.qconfig = get_default_qconfig("x86")
    prepared = prepare(model)
    with torch.no_grad():
        for batch in calib.split(64):  # calibration
            prepared(batch)
    plan = defend_prepared(prepared, calib, efrap, progress=False) if efrap is not None else None  # EFRAP
    return convert(prepared), plan


def red_team(digits, seed: int):
    """The float model a user would download: trained, then given a QCB aimed at the x86 weight grid."""
    torch.manual_seed(seed)
    clean = train(TutorialNet(), digits.train, epochs=30, lr=3e-3, seed=seed, progress=False)
    grid = observer_scheme(get_default_qconfig("x86").weight())  # the grid its weights round to
    result = PQBackdoor()(clean, digits.train, default_trigger(8), grid, progress=False)
    return result.model.eval(), result.trigger


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse_flags(parser, model=False)
    torch.backends.quantized.engine = "x86"

    digits = load_digits(seed=0)
    model, trigger = red_team(digits, args.seed)
    calib, test = digits.train.x[:1024], digits.test
    stock, _ = ptq(model, calib, efrap=None)
    defended, plan = ptq(model, calib, efrap=args.efrap)
    report = verify_eager(defended, plan, strict=False)  # EFRAP: integers read back from the int8 model
    row = {"flow": "eager", **compare(test, trigger, float=model, stock=stock, efrap=defended)}
    row.update(integers_ok=report.integers_ok, layers=report.layers)
    print(json.dumps(row) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in row.items()))
    return 0 if report.integers_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
