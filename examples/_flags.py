"""The flags every flow example shares, so that each example's own code is its flow."""

from __future__ import annotations

import argparse
import warnings

import torch

from efrap_plugin import EFRAPConfig


def parse_flags(parser: argparse.ArgumentParser, *, model: bool = True) -> argparse.Namespace:
    """Add ``--model`` (where the example can take an attacked model), ``--seed``, ``--efrap`` and
    ``--json`` to ``parser``, parse the command line, and run quietly on one torch thread (small work
    runs fastest there)."""
    if model:
        parser.add_argument("--model", help="an `efrap attack` folder to use instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--efrap",
        type=EFRAPConfig.from_json,
        default=EFRAPConfig(),
        help="EFRAPConfig fields as JSON, e.g. '{\"budget\": 1}' (default: the defaults)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    return args
