"""Run an example script as a user would and check its JSON row against the project's bars."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from efrap_plugin.redteam import Metrics, backdoor_removed

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str) -> dict:
    out = _run(script, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def assert_example_takes_the_config(script: str, *args: str) -> None:
    """The example's --efrap JSON reaches its defense: a device nobody has stops it there, named."""
    out = _run(script, *args, "--efrap", '{"device": "no-such-device"}')
    assert out.returncode != 0 and "device: 'no-such-device' is not usable here" in out.stderr


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args, "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def assert_defended(row: dict) -> None:
    """stock >= 90% asr; EFRAP at the project's bar; integers read back from the int8 artifact."""
    as_metrics = {k: Metrics(row[f"{k}_acc"] / 100, row[f"{k}_asr"] / 100, 0.0) for k in ("float", "efrap")}
    assert row["integers_ok"] and row["stock_asr"] >= 90
    assert backdoor_removed(as_metrics["float"], as_metrics["efrap"])
