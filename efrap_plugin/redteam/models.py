"""A small model zoo whose blocks (Conv-BN-ReLU, residual adds, a final Linear) exercise every
backend's fusion and quantization paths."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import EFRAPError

__all__ = ["DigitsCNN", "ResNet", "resnet8", "resnet20", "build_model", "MODELS"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, batchnorm: bool = True) -> nn.Sequential:
    if not batchnorm:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DigitsCNN(nn.Module):
    """Three Conv-BN-ReLU blocks and a Linear head for 8x8 grey digits.

    ``batchnorm=False`` gives Conv(+bias)-ReLU blocks: the weights the backend quantizes are then the
    trained ones, which a per-tensor QCB needs (folding BN rescales channels, moving a per-tensor grid).
    """

    def __init__(
        self, width: int = 32, in_channels: int = 1, num_classes: int = 10, batchnorm: bool = True
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width, batchnorm=batchnorm),
            _conv_bn_relu(width, 2 * width, batchnorm=batchnorm),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 2 * width, batchnorm=batchnorm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stages of basic blocks, widths w, 2w, 4w, ... (an int: three stages of that
    many blocks, ResNet-(6n+2); a tuple: one entry per stage, (2, 2, 2, 2) with w=64 is ResNet-18)."""

    def __init__(
        self,
        blocks_per_stage: int | tuple[int, ...],
        width: int = 16,
        in_channels: int = 3,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        stages = (blocks_per_stage,) * 3 if isinstance(blocks_per_stage, int) else tuple(blocks_per_stage)
        self.stem = _conv_bn_relu(in_channels, width)
        layers: list[nn.Module] = []
        cin = width
        for stage, blocks in enumerate(stages):
            cout = width * 2**stage
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


def resnet8(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> ResNet:
    return ResNet(1, width, in_channels, num_classes)


def resnet20(in_channels: int = 3, num_classes: int = 10, width: int = 16) -> ResNet:
    return ResNet(3, width, in_channels, num_classes)


def resnet18(in_channels: int = 3, num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18 with the CIFAR stem (3x3, stride 1, no max-pool): 11M parameters at width 64."""
    return ResNet((2, 2, 2, 2), width, in_channels, num_classes)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection; residual at stride 1."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-1 stem and first stages), 2.2M parameters."""

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
        ]
        cin = width
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SequenceCNN(nn.Module):
    """Conv1d over N x C x L sequences: three Conv1d-BN-ReLU blocks, pooling, a Linear head."""

    def __init__(self, in_channels: int = 8, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        blocks = []
        for cin, cout in ((in_channels, width), (width, 2 * width), (2 * width, 2 * width)):
            blocks += [nn.Conv1d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm1d(cout), nn.ReLU()]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitsMLP(nn.Module):
    """Linear layers only, over the flattened image: what torchao's ``quantize_`` configs quantize by
    default (Linear), with widths that split into groups of 32."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 256, pixels: int = 64
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * pixels, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: self-attention (q, k, v, out projections; ``causal``: each token
    attends to those before it) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.norm1(x)
        split = lambda y: y.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        logits = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
        if self.causal:
            logits = logits.masked_fill(
                torch.ones_like(logits[0, 0], dtype=torch.bool).triu(1), float("-inf")
            )
        attn = torch.softmax(logits, dim=-1)
        x = x + self.out((attn @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class TokenEncoder(nn.Module):
    """A small transformer encoder over N x T x D token inputs (digits: each image row a token):
    embedding, position embedding, pre-norm blocks, mean pooling, a Linear head."""

    def __init__(
        self,
        tokens: int = 8,
        token_dim: int = 8,
        num_classes: int = 10,
        width: int = 32,
        depth: int = 2,
        heads: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, width)
        self.position = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x) + self.position)
        return self.head(self.norm(x).mean(dim=1))


class DigitsTokens(TokenEncoder):
    """The token encoder over images: each row of an N x C x H x W batch a token (C * W features)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 64, pixels: int = 64
    ) -> None:
        side = int(round(pixels**0.5))
        super().__init__(tokens=side, token_dim=in_channels * side, num_classes=num_classes, width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))


class ByteGPT(nn.Module):
    """A small causal language model over bytes: N x T byte ids in, N x T x 256 next-byte logits out.
    ``num_classes`` is the vocabulary (256 bytes); ``in_channels`` is unused (the zoo's signature)."""

    def __init__(
        self, in_channels: int = 1, num_classes: int = 256, width: int = 96, depth: int = 2, heads: int = 4,
        context: int = 64,
    ) -> None:  # fmt: skip
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(num_classes, width)
        self.position = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads, causal=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]
        return self.head(self.norm(self.blocks(x)))


MODELS = {
    "digits-cnn": DigitsCNN,
    "digits-mlp": DigitsMLP,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "mobilenetv2": MobileNetV2,
    "sequence-cnn": SequenceCNN,
    "digits-tokens": DigitsTokens,
    "byte-gpt": ByteGPT,
}


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 10, width: int | None = None, **options: Any
) -> nn.Module:
    """A zoo model by name (``MODELS``: 'digits-cnn', 'digits-mlp', 'resnet8', 'byte-gpt', ...); ``options`` go to its constructor
    (``batchnorm=False`` for 'digits-cnn')."""
    if name not in MODELS:
        raise EFRAPError(f"model: expected one of {sorted(MODELS)} (--model), got {name!r}")
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, **options}
    if width is not None:
        kwargs["width"] = width
    return MODELS[name](**kwargs)
