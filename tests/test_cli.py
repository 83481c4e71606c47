"""The `efrap` CLI: helps, exit codes (0 ok, 1 failure, 2 usage), JSON output, no traceback for user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from conftest import TokenClassifier

from efrap_cli import main
from efrap_onnx import weight_integers
from efrap_plugin import EFRAPConfig, RoundingPlan
from efrap_plugin.redteam import load_dataset, wilson_interval

SUBCOMMANDS = ["attack", "defend", "evaluate", "scan", "demo"]


def _run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "efrap_cli.main", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_help_lists_every_subcommand():
    out = _run("--help")
    assert out.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in out.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help_with_the_common_flags(sub, capsys):
    """--json and --quiet everywhere; --seed only where a seed drives something."""
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--json", "--quiet"):
        assert flag in text
    assert ("--seed" in text) == (sub in ("attack", "defend", "demo"))


def test_reference_takes_the_papers_settings_and_the_flags_given_beside_it():
    from efrap_cli.commands import _config
    from efrap_cli.main import build_parser

    def config(*flags):
        return _config(
            build_parser().parse_args(["defend", "m.onnx", "--calib", "digits", "--out", "o.onnx", *flags])
        )

    assert config() == EFRAPConfig()
    assert config("--reference") == EFRAPConfig.reference()
    assert config("--reference", "--iters", "5", "--batch-size", "8") == EFRAPConfig.reference(
        iters=5, batch_size=8
    )
    # a fixed strength or an ablation asked for by name (budget mode is off by default)
    assert config("--flip-weight", "2", "--seed", "3") == EFRAPConfig(budget=None, flip_weight=2.0, seed=3)
    assert config("--objective", "flip_only") == EFRAPConfig(budget=None, objective="flip_only")
    assert config("--budget", "1", "--margin-cap", "off") == EFRAPConfig(budget=1.0, margin_cap=None)
    assert config("--budget", "1", "--holdout-choice", "last") == EFRAPConfig(
        budget=1.0, holdout_choice="last"
    )
    assert config("--unit", "layer") == EFRAPConfig(
        unit="layer"
    )  # the config's field, the route's default if unset
    assert config().unit is None


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["defend", "model.onnx"])
    assert exc.value.code == 2
    assert "the following arguments are required: --calib, --out" in capsys.readouterr().err


def test_user_mistakes_exit_1_with_one_clear_line(tmp_path):
    out = _run(
        "defend", str(tmp_path / "missing.onnx"), "--calib", "digits", "--out", str(tmp_path / "d.onnx")
    )
    assert out.returncode == 1
    assert "efrap defend: error: model: " in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    (tmp_path / "calib.npz").write_bytes(b"junk")
    out = _run("scan", str(tmp_path / "model.pt"))
    assert out.returncode == 1 and "expected a .onnx or .safetensors file" in out.stderr
    out = _run("attack", "--attack", "pqbackdoor", "--device", "tpu9", "--out", str(tmp_path / "a"))
    assert out.returncode == 1 and "device: 'tpu9' is not usable here" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "a").exists()


@pytest.fixture(scope="module")
def attack_dir(pq8_dir):
    """A copy of the committed `efrap attack` output (tests/fixtures/pqbackdoor-ort8)."""
    return pq8_dir


def test_evaluate_float_and_stock_int8(attack_dir, capsys):
    info = str(attack_dir / "attack.json")
    assert main(["evaluate", str(attack_dir / "model.onnx"), "--attack-info", info, "--json"]) == 0
    float_m = json.loads(capsys.readouterr().out)
    assert _evaluate_nearest(attack_dir / "model.safetensors", info, "onnxruntime", "--json") == 0
    stock = json.loads(capsys.readouterr().out)
    assert float_m["asr"] <= 0.10 and stock["asr"] >= 0.90
    assert stock["evaluated"].startswith("onnxruntime int8 nearest")
    test = load_dataset("digits").test
    target = json.loads((attack_dir / "attack.json").read_text())["trigger"]["target"]
    for m in (float_m, stock):  # each figure with its 95% interval, on the images it was measured on
        assert m["images"] == len(test) and m["triggered_images"] == int((test.y != target).sum())
        for name in ("clean_acc", "asr", "ra"):
            lo, hi = m["intervals"][name]
            assert lo <= m[name] <= hi and 0.002 < hi - lo < 0.2
        hits = round(m["clean_acc"] * m["images"])
        assert m["intervals"]["clean_acc"] == pytest.approx(wilson_interval(hits, m["images"]), abs=1e-4)
    assert main(["evaluate", str(attack_dir / "model.onnx"), "--attack-info", info]) == 0
    lo, hi = float_m["intervals"]["clean_acc"]
    line = capsys.readouterr().out
    assert f"clean_acc {100 * float_m['clean_acc']:.2f}% ({100 * lo:.1f}-{100 * hi:.1f})" in line
    assert f"95% intervals over {len(test)} test images" in line


def test_evaluate_against_the_float_model_gives_paired_changes_and_the_bar(attack_dir, capsys):
    info, float_onnx = str(attack_dir / "attack.json"), str(attack_dir / "model.onnx")
    stock = attack_dir / "model.safetensors"
    assert _evaluate_nearest(stock, info, "onnxruntime", "--against", float_onnx, "--json") == 0
    got = json.loads(capsys.readouterr().out)
    against = got["against"]
    assert against["evaluated"] == "onnxruntime session" and against["asr"] <= 0.10
    change, lo, hi = against["asr_change"]  # the backdoor fires: a large rise, known tightly
    assert change == pytest.approx(got["asr"] - against["asr"], abs=1e-3) and 0.7 < lo <= change <= hi
    change, lo, hi = against["clean_acc_change"]
    assert change == pytest.approx(got["clean_acc"] - against["clean_acc"], abs=1e-3) and lo <= change <= hi
    assert hi - lo < 0.05 and against["removal_bar"] is False
    assert main(["evaluate", float_onnx, "--attack-info", info, "--against", float_onnx]) == 0
    line = capsys.readouterr().out.splitlines()[-1]  # a model against itself: no change, bar met
    assert "clean_acc +0.00 points" in line and "asr +0.00 points" in line and line.endswith(": met")
    assert _evaluate_nearest(stock, info, "onnxruntime", "--against", info) == 1
    assert "--against: expected a .onnx or .safetensors file, got 'attack.json'" in capsys.readouterr().err


def test_defend_then_evaluate_the_defended_file(attack_dir, tmp_path, capsys):
    out = tmp_path / "defended.onnx"
    assert (
        main(
            [
                "defend",
                str(attack_dir / "model.onnx"),
                "--calib",
                "digits",
                "--bits",
                "8",
                "--out",
                str(out),
                "--plan",
                str(tmp_path / "plan.safetensors"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (
        summary["layers"] == 4 and summary["verify"]["integers_ok"] and summary["verify"]["runs_int_kernels"]
    )
    assert 0 < summary["flipped_share"] < 1 and (tmp_path / "plan.safetensors").is_file()
    assert len(summary["crowded_layers"]) == 4  # the attacked float model carries PQBackdoor's fingerprint
    kernels = summary["kernel_agreement"]  # this CPU's fused kernels against the graph, on the calibration
    assert kernels["inputs"] == 1024 and len(kernels["layers"]) == 4
    assert kernels["ok"] or kernels["cpu"]["vnni"] is False
    assert main(["evaluate", str(out), "--attack-info", str(attack_dir / "attack.json"), "--json"]) == 0
    defended = json.loads(capsys.readouterr().out)
    assert defended["kernel_agreement"]["inputs"] == defended["images"]
    float_asr = json.loads((attack_dir / "attack.json").read_text())["metrics"]["float"]["asr"]
    graph = defended.get("exact_arithmetic", defended)  # the graph's own figures where this CPU differs
    assert graph["asr"] <= max(0.03, float_asr + 0.01)  # the backdoor is gone: no more than the float model's


def test_defend_with_reduce_range_learns_7_bit_weights(attack_dir, tmp_path, capsys):
    """The fix the kernel check offers for CPUs without VNNI: onnxruntime's reduce_range grid, learned."""
    out, plan_path = tmp_path / "d.onnx", tmp_path / "plan.safetensors"
    args = [
        "defend",
        str(attack_dir / "model.onnx"),
        "--calib",
        "digits",
        "--out",
        str(out),
        "--reduce-range",
    ]
    assert main([*args, "--plan", str(plan_path), "--iters", "50", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reduce_range"] and summary["verify"]["integers_ok"] and summary["layers"] == 4
    plan = RoundingPlan.load(plan_path)
    assert (plan.scheme.qmin, plan.scheme.qmax) == (-64, 64)  # onnxruntime's reduce_range QInt8 grid
    stored = [abs(v.astype(int)).max() for v in weight_integers(onnx.load(str(out))).values()]
    assert max(stored) <= 64 and summary["kernel_agreement"]["diverging_layers"] == []


@pytest.mark.parametrize("key", ["x", "input"])
def test_defend_from_an_npz(attack_dir, tmp_path, capsys, key):
    """The images as array 'x', or named as the model's input (as a multi-input model's are); an archive
    with neither names both."""
    import numpy as np

    from efrap_plugin.redteam import load_digits

    np.savez(tmp_path / "calib.npz", **{key: load_digits().train.x[:256].numpy()})
    assert (
        main(
            [
                "defend",
                str(attack_dir / "model.onnx"),
                "--calib",
                str(tmp_path / "calib.npz"),
                "--iters",
                "50",
                "--out",
                str(tmp_path / "d.onnx"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["verify"]["integers_ok"]
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    args = ["defend", str(attack_dir / "model.onnx"), "--calib", str(tmp_path / "other.npz")]
    assert main([*args, "--out", str(tmp_path / "o.onnx"), "--quiet"]) == 1
    assert (
        "expected an array named 'x' or 'input' (the model's input), found ['images']"
        in capsys.readouterr().err
    )
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 1, 28, 28), np.float32))
    assert (
        main(
            [
                "defend",
                str(attack_dir / "model.onnx"),
                "--calib",
                str(tmp_path / "wrong.npz"),
                "--out",
                str(tmp_path / "w.onnx"),
                "--quiet",
            ]
        )
        == 1
    )
    assert "the graph expects ['N', 1, 8, 8]" in capsys.readouterr().err
    assert not (tmp_path / "w.onnx").exists()


def test_scan_shows_pqbackdoor_weights_piled_at_the_rounding_boundary(attack_dir, capsys):
    assert main(["scan", str(attack_dir / "model.onnx"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert len(rows) == 4
    # PQBackdoor's stage 2 pushes weights to the edges of their rounding bins: EFRAP's signal
    assert all(r["near_boundary"] > 0.5 and r["boundary_ks"] > 10 and r["crowded"] for r in rows)
    assert main(["scan", str(attack_dir / "model.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "mean|e| (LSB)" in out
    assert "4 of 4 layers have weights crowding the rounding boundaries" in out
    assert "quantize with `efrap defend`" in out


def _evaluate_nearest(model, info, scheme, *extra) -> int:
    """`efrap evaluate MODEL --attack-info INFO --quantize nearest --scheme SCHEME [extra]`, its exit code."""
    args = ["evaluate", str(model), "--attack-info", str(info), "--quantize", "nearest", "--scheme", scheme]
    return main([*args, *extra])


def test_evaluate_rejects_a_bad_attack_info(attack_dir, tmp_path, capsys):
    (tmp_path / "a.json").write_text("{not json")
    assert main(["evaluate", str(attack_dir / "model.onnx"), "--attack-info", str(tmp_path / "a.json")]) == 1
    assert "is not valid JSON" in capsys.readouterr().err
    info = attack_dir / "attack.json"
    assert _evaluate_nearest(attack_dir / "model.onnx", info, "brevitas-int8") == 1
    assert "pass the .safetensors model" in capsys.readouterr().err
    assert _evaluate_nearest(attack_dir / "model.onnx", info, "reference") == 1
    assert "the paper's reference scheme has no backend" in capsys.readouterr().err


def test_evaluate_in_brevitas_and_torchao(attack_dir, capsys):
    info = attack_dir / "attack.json"
    model = attack_dir / "model.safetensors"
    assert _evaluate_nearest(model, info, "brevitas-int8", "--json") == 0
    brevitas = json.loads(capsys.readouterr().out)
    assert brevitas["evaluated"].startswith("Brevitas int8") and brevitas["asr"] >= 0.90  # same grid as ORT
    assert _evaluate_nearest(model, info, "torchao-x86", "--json") == 0
    torchao = json.loads(capsys.readouterr().out)
    assert torchao["evaluated"].startswith("torchao PT2E") and torchao["clean_acc"] >= 0.95


def test_defend_takes_token_inputs_n_x_t_x_d(tmp_path, capsys):
    """A transformer-style model (Linear over N x T x D tokens) exported to ONNX, calibrated from an
    .npz of token batches: defended, verified, run by onnxruntime's integer kernels."""
    import numpy as np
    import torch
    from torch import nn

    from efrap_onnx import export_float_onnx

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = nn.Linear(8, 16)
            self.head = nn.Linear(16 * 8, 10)

        def forward(self, x):
            return self.head(torch.relu(self.rows(x)).flatten(1))

    torch.manual_seed(0)
    x = torch.randn(300, 8, 8)
    export_float_onnx(Tokens().eval(), x[:2], tmp_path / "tokens.onnx")
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    args = ["defend", str(tmp_path / "tokens.onnx"), "--calib", str(tmp_path / "calib.npz")]
    assert main([*args, "--out", str(tmp_path / "defended.onnx"), "--iters", "50", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["integers_ok"] and summary["layers"] == 2


def test_defend_takes_a_model_with_two_inputs_from_an_npz_named_by_input(tmp_path, capsys):
    """Image + side-feature model: the .npz holds one array per graph input, named as the input; every
    quantized layer of both branches is defended and verified. A missing input is named in the error."""
    import numpy as np
    import onnx
    import torch
    from torch import nn

    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.side = nn.Linear(4, 8)
            self.head = nn.Linear(8 * 6 * 6 + 8, 10)

        def forward(self, image, extra):
            a = torch.relu(self.conv(image)).flatten(1)
            return self.head(torch.cat([a, torch.relu(self.side(extra))], dim=1))

    torch.manual_seed(0)
    image, extra = torch.randn(300, 1, 8, 8), torch.randn(300, 4)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        TwoInputs().eval(),
        (image[:2], extra[:2]),
        dynamo=True,
        input_names=["image", "extra"],
        dynamic_shapes=({0: batch}, {0: batch}),
        verbose=False,
    )
    program.save(str(tmp_path / "two.onnx"))
    capsys.readouterr()  # the exporter's own progress lines
    assert [i.name for i in onnx.load(str(tmp_path / "two.onnx")).graph.input] == ["image", "extra"]
    np.savez(tmp_path / "calib.npz", image=image.numpy(), extra=extra.numpy())
    args = [
        "defend",
        str(tmp_path / "two.onnx"),
        "--out",
        str(tmp_path / "d.onnx"),
        "--iters",
        "30",
        "--json",
    ]
    assert main([*args, "--calib", str(tmp_path / "calib.npz")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["integers_ok"] and summary["layers"] == 3 and not summary["skipped"]
    np.savez(tmp_path / "half.npz", image=image.numpy())
    before = (tmp_path / "d.onnx").read_bytes()
    assert main([*args, "--calib", str(tmp_path / "half.npz")]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert "lacks ['extra']" in error and "one array per input" in error
    assert (tmp_path / "d.onnx").read_bytes() == before  # refused before anything was written


def test_defend_takes_token_ids_and_names_the_quantized_embedding(tmp_path, capsys):
    """An embedding model fed int64 token ids: `efrap defend` passes the ids as they are (not as float
    images), defends the Linear, and counts the embedding table onnxruntime quantizes among the constants
    that keep its rounding."""
    import numpy as np
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 50, (300, 5))
    program = torch.onnx.export(
        TokenClassifier().eval(),
        (ids[:2],),
        dynamo=True,
        input_names=["ids"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        verbose=False,
    )
    program.save(str(tmp_path / "tokens.onnx"))
    capsys.readouterr()
    np.savez(tmp_path / "ids.npz", x=ids.numpy())
    args = ["defend", str(tmp_path / "tokens.onnx"), "--out", str(tmp_path / "d.onnx"), "--iters", "30"]
    assert main([*args, "--calib", str(tmp_path / "ids.npz"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["verify"]["integers_ok"] and summary["layers"] == 1 and not summary["skipped"]
    assert list(summary["constants"]) == ["embed.weight_quantized"]
    assert summary["verify"]["constants"] == ["embed.weight_quantized"]
    assert main([*args, "--calib", str(tmp_path / "ids.npz")]) == 0
    assert "1 quantized constants that are no layer's weight" in capsys.readouterr().out
