"""The demo's report: a terminal table, results.json, report.md and two PNG figures."""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from efrap_plugin import atomic_write

__all__ = ["format_table", "write_report", "write_table"]

ROWS = (
    ("float", "float model (onnxruntime fp32)"),
    ("stock", "stock int8 (quantize_static)"),
    ("efrap", "EFRAP int8 (efrap defend)"),
)


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{'model':<34} {'clean_acc':>9} {'asr':>8} {'ra':>8} {'seconds':>8}", "-" * 71]
    for key, label in ROWS:
        m = results["rows"][key]
        lines.append(
            f"{label:<34} {100 * m['clean_acc']:>8.2f}% {100 * m['asr']:>7.2f}% {100 * m['ra']:>7.2f}% "
            f"{m['seconds']:>8.1f}"
        )
    return "\n".join(lines)


def _figures(results: dict[str, Any], layers: dict[str, np.ndarray], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label.split(" (")[0] for _, label in ROWS]
    metrics = ("clean_acc", "asr", "ra")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.26
    for i, metric in enumerate(metrics):
        vals = [100 * results["rows"][key][metric] for key, _ in ROWS]
        bars = ax.bar(np.arange(3) + (i - 1) * width, vals, width, label=metric)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(3), labels)
    ax.set_ylabel("%")
    ax.set_ylim(0, 125)
    ax.set_title(
        f"{results['attack']} on digits, onnxruntime int{results['bits']}: metrics on the real backend"
    )
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)

    names = list(layers)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in names:
        left.hist(layers[name], bins=25, range=(0, 0.5), histtype="step", density=True, label=name)
    left.set_xlabel("nearest-rounding truncation error |w - Q(w)| (integer steps)")
    left.set_ylabel("density")
    left.set_title("truncation error per layer")
    left.legend(fontsize=7)
    shares = [100 * results["per_layer_flipped"][n] for n in names]
    right.barh(range(len(names)), shares)
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("weights whose rounding EFRAP flipped (%)")
    right.set_title("flipped share per layer")
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=120)
    plt.close(fig)
    return ["metrics.png", "layers.png"]


def write_report(results: dict[str, Any], layers: dict[str, np.ndarray], out: Path) -> list[Path]:
    """results.json, report.md and the figures, each written atomically into ``out``."""
    figures = _figures(results, layers, out)
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    v = results["verify"]
    md = [
        f"# EFRAP demo: {results['attack']} on scikit-learn digits, onnxruntime int{results['bits']}",
        "",
        "A clean CNN is trained, a quantization-conditioned backdoor is planted, onnxruntime's stock",
        "`quantize_static` activates it, and `efrap defend` writes a QDQ model that removes it.",
        "All metrics come from onnxruntime InferenceSessions on the written files.",
        "",
        "| model | clean_acc | asr | ra | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        m = results["rows"][key]
        md.append(
            f"| {label} | {100 * m['clean_acc']:.2f}% | {100 * m['asr']:.2f}% | {100 * m['ra']:.2f}% | "
            f"{m['seconds']:.1f} |"
        )
    md += [
        "",
        f"DER (defense effectiveness rating, stock -> EFRAP): {results['der']:.3f}",
        "",
        f"Verification: integers read back from `efrap-int{results['bits']}.onnx` "
        f"{'match the plan in every layer' if v['integers_ok'] else 'DIFFER from the plan'}; onnxruntime's "
        f"optimized graph runs {', '.join(f'{k} x{n}' for k, n in v['int_kernels'].items()) or 'no integer kernel'}.",
        "",
        "![metrics](metrics.png)",
        "",
        "Per layer: how the truncation errors of nearest rounding spread, and how many roundings EFRAP flipped.",
        "",
        "![layers](layers.png)",
        "",
    ]
    atomic_write(out / "report.md", "\n".join(md).encode())
    return [out / "results.json", out / "report.md"] + [out / f for f in figures]


def _cpu() -> str:
    """The CPU a table was measured on, with the int8 features onnxruntime's kernels depend on."""
    try:
        from efrap_onnx import cpu_features
    except ImportError:  # the onnx extra is not installed
        import platform

        return platform.machine()
    return cpu_features().describe()


def write_table(out: Path, name: str, rows: list[dict], note: str, command: str | None = None) -> list[Path]:
    """``out/name.csv`` and ``out/name.md`` (the command that made them, a note, the table), atomically."""
    cols = list(rows[0])
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    md = [
        f"# {name}",
        "",
        f"Command: `{command or shlex.join(['python', *sys.argv])}`",
        "",
        f"CPU: {_cpu()}",
        "",
        note,
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return [
        atomic_write(out / f"{name}.csv", buffer.getvalue().encode()),
        atomic_write(out / f"{name}.md", ("\n".join(md) + "\n").encode()),
    ]
