"""`import efrap_plugin` needs no backend: the core never imports an adapter or a backend library."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_without_touching_backends():
    code = (
        "import sys, efrap_plugin, efrap_plugin.redteam.attacks\n"
        "bad = [m for m in ('onnx', 'onnxruntime', 'torchao', 'brevitas', 'efrap_onnx', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_core_sources_never_name_an_adapter():
    from pathlib import Path

    import efrap_plugin

    root = Path(efrap_plugin.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in ("efrap_onnx", "efrap_cli", "import onnxruntime", "import brevitas", "import torchao"):
            assert name not in text, f"{path.name} mentions {name}"


def test_the_defense_never_imports_the_red_team_kit():
    """``import efrap_plugin`` (the defense) loads neither the red-team kit nor scikit-learn, its extra."""
    code = "import sys, efrap_plugin\nprint(','.join(m for m in ('efrap_plugin.redteam', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
