"""Defend a torch model and export a verified int8 ONNX model: the Python API end to end on digits.

python examples/defend_torch_model.py
"""

from __future__ import annotations

from efrap_onnx import export_defended, session
from efrap_plugin import EFRAPConfig, defend
from efrap_plugin.redteam import evaluate
from efrap_plugin.redteam.attacks import run_attack


def main() -> None:
    result, splits, _ = run_attack("pqbackdoor", "digits", "onnxruntime", 8, seed=0)
    calib = splits.train.x[:1024]
    plan = defend(result.model, calib, scheme="onnxruntime", config=EFRAPConfig())
    _, report = export_defended(result.model, plan, calib, "defended.onnx")
    print("float:", evaluate(result.model, splits.test, result.trigger))
    print("EFRAP int8 (onnxruntime):", evaluate(session("defended.onnx"), splits.test, result.trigger))
    print("verified:", report.to_dict())


if __name__ == "__main__":
    main()
