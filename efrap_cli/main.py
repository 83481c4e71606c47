"""Argument parsing, logging set-up and exit codes (0 ok, 1 failure, 2 usage) for `efrap`."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from efrap_plugin import HOLDOUT_CHOICES, UNITS, EFRAPConfig, EFRAPError
from efrap_plugin.redteam.attacks import ATTACKS
from efrap_plugin.schemes import SCHEME_PRESETS

__all__ = ["build_parser", "main"]

log = logging.getLogger("efrap")


def _common(p: argparse.ArgumentParser, seed: int | None = None) -> None:
    """--json, --quiet, -v everywhere; --seed only on the subcommands it drives."""
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    if seed is not None:
        p.add_argument("--seed", type=int, default=seed, help=f"random seed (default: {seed})")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _scheme(p: argparse.ArgumentParser, bits_help: str = "weight bit width, 2..8 (default: 8)") -> None:
    p.add_argument(
        "--scheme",
        choices=sorted(SCHEME_PRESETS),
        default="onnxruntime",
        help="backend quantization scheme (default: onnxruntime)",
    )
    p.add_argument("--bits", type=int, default=8, help=bits_help)


def _defense_flags(p: argparse.ArgumentParser) -> None:
    """EFRAPConfig's knobs. Unset ones take the default, or the paper's value under --reference."""
    d, ref = EFRAPConfig(), EFRAPConfig.reference()
    for flag, kind, field, text in (
        ("--iters", int, "iters", "optimizer steps per layer"),
        ("--lr", float, "lr", "learning rate of the rounding logits"),
        ("--batch-size", int, "batch_size", "cached calibration inputs per step"),
        (
            "--flip-weight",
            float,
            "flip_weight",
            "one fixed strength for every layer, the weight of the error-guided flipping term (not with "
            "--budget)",
        ),
        ("--patience", int, "patience", "end a layer once its integers are stable this many steps; 0: off"),
        (
            "--settle",
            float,
            "settle",
            "share of a layer's integers that may change per 50 steps while stable",
        ),
        (
            "--holdout",
            int,
            "holdout",
            "budget mode: calibration images held out of the optimisation to measure on (--calib-size + N "
            "are read; at most a quarter when fewer are given); each weighs 100/N percent",
        ),
        (
            "--max-strength",
            float,
            "max_strength",
            "budget mode: the largest share of a layer's weights whose rounding is flipped by force",
        ),
    ):
        default, reference = getattr(d, field), getattr(ref, field)
        note = f"; {reference} with --reference" if reference != default else ""
        p.add_argument(flag, type=kind, default=None, help=f"{text} (default: {default}{note})")
    p.add_argument(
        "--budget",
        type=_percent_or_off,
        default=argparse.SUPPRESS,
        help="budget mode: the top-1 disagreement with the float model, in percent of held-out calibration "
        "images, that flipping may add to quantization's own; each layer takes the strongest flipping "
        "within it. 'off': "
        f"one fixed --flip-weight (default: {'off' if d.budget is None else d.budget}; off with --reference)",
    )
    p.add_argument(
        "--margin-cap",
        type=_percent_or_off,
        default=argparse.SUPPRESS,
        help="budget mode: the largest share, in percent of held-out calibration images, whose float class's "
        "margin over the next class flipping may halve; each layer's search also stops there. 'off': no cap "
        f"(default: {'off' if d.margin_cap is None else d.margin_cap})",
    )
    p.add_argument(
        "--holdout-choice",
        choices=HOLDOUT_CHOICES,
        default=None,
        help="budget mode: which calibration images are held out: 'boundary', those nearest the float model's "
        "decision boundaries (where a costly rounding flips decisions first), or 'last', the last ones given "
        f"(default: {d.holdout_choice})",
    )
    p.add_argument(
        "--calib-size",
        type=int,
        default=d.calib_size,
        help=f"calibration images the optimisation uses; budget mode holds out up to {d.holdout} more "
        f"(default: {d.calib_size})",
    )
    p.add_argument(
        "--objective",
        choices=["efrap", "flip_only", "preserve_only"],
        default=d.objective,
        help="full EFRAP or an ablation (an ablation is not run with --budget; default: efrap)",
    )
    p.add_argument(
        "--unit",
        choices=UNITS,
        default=None,
        help="what the layer's output term preserves: 'activation', its output after the ReLU that "
        "follows it, or 'layer', its raw output (default: activation)",
    )
    p.add_argument(
        "--reference",
        action="store_true",
        help="the paper's settings: 10,000 steps of lr 1e-3 per layer, reference loss balance "
        "(flags given beside it still apply)",
    )


def _percent_or_off(text: str) -> float | None:
    if text.lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a percentage such as 1 or 0.5, or 'off', got {text!r}"
        ) from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected a percentage in [0, 100], got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efrap",
        description="Defend quantized models against quantization-conditioned backdoors (EFRAP), "
        "red-team PTQ pipelines with QCB attacks, and measure both on the real backend.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("attack", help="plant a QCB in a model trained on an offline dataset")
    p.add_argument("--attack", choices=sorted(ATTACKS), required=True, help="which QCB attack")
    p.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits", help="training data")
    _scheme(p)
    p.add_argument("--out", required=True, help="output folder: model.safetensors, model.onnx, attack.json")
    p.add_argument("--device", default=None, help="where training runs, e.g. cuda (default: cpu)")
    _common(p, seed=0)

    p = sub.add_parser(
        "evaluate", help="clean_acc / asr / ra of a float, quantized or defended model, with 95%% intervals"
    )
    p.add_argument("model", help=".onnx or .safetensors model")
    p.add_argument("--attack-info", required=True, help="attack.json written by `efrap attack`")
    p.add_argument(
        "--quantize",
        choices=["none", "nearest"],
        default="none",
        help="evaluate the model itself (none) or its stock round-to-nearest quantization",
    )
    p.add_argument(
        "--against",
        help="a reference .onnx / .safetensors model (the float one) evaluated as it is on the same images: "
        "each figure's change with its paired 95%% interval, and whether the removal bar is met",
    )
    _scheme(p)
    _common(p)

    p = sub.add_parser("defend", help="write an EFRAP-defended QDQ int8 model from a float ONNX file")
    p.add_argument("model", help="float .onnx model")
    p.add_argument(
        "--calib",
        required=True,
        help="digits, fashion-mnist, or an .npz with inputs in array 'x' "
        "(a model with several inputs: one array per input, named as the input)",
    )
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="weight bits: 8 (QInt8) or 4 (QInt4)")
    p.add_argument(
        "--per-tensor", action="store_true", help="one weight scale per tensor (default: per channel)"
    )
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="7-bit weights (onnxruntime's reduce_range), learned on that grid: the int8 kernels of CPUs "
        "without VNNI compute them exactly",
    )
    p.add_argument("--out", required=True, help="defended QDQ .onnx to write")
    p.add_argument("--plan", help="also save the RoundingPlan (.safetensors)")
    p.add_argument(
        "--device", default="cpu", help="where each layer's optimisation runs, e.g. cuda (default: cpu)"
    )
    _defense_flags(p)
    _common(p, seed=EFRAPConfig().seed)

    p = sub.add_parser(
        "scan", help="per-layer truncation errors of nearest rounding; flags weights crowding the boundaries"
    )
    p.add_argument("model", help=".onnx or .safetensors model")
    _scheme(p)
    _common(p)

    p = sub.add_parser("demo", help="the whole story on digits: attack, stock int8, EFRAP, verified report")
    p.add_argument(
        "--attack", choices=sorted(ATTACKS), default="pqbackdoor", help="QCB to plant (default: pqbackdoor)"
    )
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="weight bits (default: 8)")
    p.add_argument("--out", default="demo-out", help="report folder (default: demo-out)")
    _common(p, seed=0)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger().addFilter(_below_error_from_root)  # a logger's filter sees its own records only
    for noisy in ("torch", "onnxscript", "onnx_ir", "torch.onnx", "onnxruntime", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _below_error_from_root(record: logging.LogRecord) -> bool:
    """Drops what libraries log through the root logger itself below ERROR (onnxruntime's quantizer calls
    logging.warning): the root logger's level must stay the user's, or no library warning shows."""
    return record.name != "root" or record.levelno >= logging.ERROR


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


def _on_sigterm(_signum, _frame):
    raise _Terminated


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(f"efrap {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"error": message, "command": args.command, "exit_code": code}))
    return code


_WRITE_REFUSED = dict.fromkeys(
    (errno.EFBIG, errno.ENOSPC, errno.EDQUOT),
    "; a write was refused by the file-size limit (ulimit -f) or a full disk: raise the limit or free space "
    "where --out and the temporary folder ($TMPDIR) are",
)
"""What to do when the file system refuses a write: the error alone names no file and no fix."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    from . import commands

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            result = commands.COMMANDS[args.command](args)
    except commands.UsageError as exc:
        return _fail(args, str(exc), 2)
    except EFRAPError as exc:
        return _fail(args, str(exc), 1)
    except OSError as exc:  # the file system refused: name the file and the reason, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}{_WRITE_REFUSED.get(exc.errno, '')}", 1)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except _Terminated:
        return _fail(args, "terminated (SIGTERM)", 143)
    except Exception as exc:  # a bug of ours: one line, the traceback with -v
        log.debug("traceback", exc_info=True)
        return _fail(
            args,
            f"internal error {type(exc).__name__}: {exc} (run with -v for the traceback and report it)",
            1,
        )
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
