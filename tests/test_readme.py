"""The README's recipes run as written, so they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _recipe(name: str) -> str:
    match = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no '{name}' recipe"
    return match.group(1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_onnx_recipe(in_tmp, pq8_onnx, calib):
    import shutil

    shutil.copy(pq8_onnx, in_tmp / "model.onnx")
    exec(compile(_recipe("onnx"), "README:onnx", "exec"), {"calib": calib})
    assert (in_tmp / "defended.onnx").is_file()


def test_torch_recipe(in_tmp, pq8, digits):
    scope = {"model": pq8.model, "calib": digits.train.x[:1024]}
    exec(compile(_recipe("torch"), "README:torch", "exec"), scope)
    assert (in_tmp / "defended.onnx").is_file() and (in_tmp / "plan.safetensors").is_file()
    assert scope["report"].matching == 4


def test_backends_recipe(in_tmp, pq8, digits):
    scope = {"model": pq8.model, "calib": digits.train.x[:512]}
    exec(compile(_recipe("backends"), "README:backends", "exec"), scope)
    assert (in_tmp / "brevitas-qcdq.onnx").is_file()


def test_pt2e_user_flow_recipe(in_tmp, pq_x86, digits):
    scope = {"model": pq_x86.model, "calib": digits.train.x[:512]}
    exec(compile(_recipe("pt2e-user-flow"), "README:pt2e-user-flow", "exec"), scope)
    plan = scope["quantizer"].plan  # the flag: learned at convert_pt2e
    assert plan.meta.flow == "pt2e" and len(plan.layers) == 4


def test_brevitas_user_flow_recipe(in_tmp, pq8, digits):
    import copy

    model = copy.deepcopy(pq8.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scope = {"model": model, "calib": digits.train.x[:512]}
    exec(compile(_recipe("brevitas-user-flow"), "README:brevitas-user-flow", "exec"), scope)
    assert scope["plan"].meta.flow == "brevitas" and len(scope["plan"].layers) == 4
    assert (in_tmp / "qcdq.onnx").is_file()
    after = model.state_dict()  # the user's float model, BatchNorm included, as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_quantize_recipe(in_tmp, digits):
    from efrap_plugin.redteam.checkpoint import load_model

    model, _ = load_model(
        Path(__file__).parent / "fixtures" / "pqbackdoor-torchao-int4-g32-mlp" / "model.safetensors"
    )
    scope = {"model": model, "calib": digits.train.x[:256]}
    exec(compile(_recipe("quantize"), "README:quantize", "exec"), scope)
    assert len(scope["plan"].layers) == 3 and (in_tmp / "int4.pt").is_file()
