"""defend(): the learned rounding removes a real QCB, deterministically, and rejects bad input clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from efrap_plugin import (
    DataError,
    EFRAPConfig,
    EFRAPError,
    LayerProblem,
    ModelError,
    QuantScheme,
    crowded_layers,
    defend,
    format_scan,
    learn_rounding,
    prepare_model,
    quantizable_layers,
    scan_weights,
)
from efrap_plugin.objective import learnable_bounds
from efrap_plugin.redteam import evaluate

FAST = EFRAPConfig(iters=200, calib_size=256, budget=None)  # the fixed-strength objective


def test_efrap_removes_pqbackdoor_in_fake_quantization(pq8, digits):
    """The headline cell: nearest keeps asr >= 90%; EFRAP leaves no more than the float model's own asr
    (the project's bar, max(3%, float + 1 point); the float model keeps 6.2% here, and the 3% bar over
    attack seeds is measured in benchmarks/results/cells-per-seed.md), clean_acc within 1 point."""
    plan = defend(pq8.model, digits.train.x, "onnxruntime", progress=False)
    float_m = evaluate(pq8.model, digits.test, pq8.trigger)
    efrap_m = evaluate(plan.apply(pq8.model), digits.test, pq8.trigger)
    nearest = pq8.metrics["fake-onnxruntime-8bit"]
    assert nearest["asr"] >= 0.90
    assert efrap_m.asr <= max(0.03, float_m.asr + 0.01)
    assert efrap_m.clean_acc >= float_m.clean_acc - 0.01
    assert 0.05 < plan.flipped_share < 0.95


def test_same_seed_same_plan_other_seed_other_plan(clean_cnn, digits):
    a = defend(clean_cnn, digits.train.x, "onnxruntime", FAST, progress=False)
    b = defend(clean_cnn, digits.train.x, "onnxruntime", FAST, progress=False)
    c = defend(clean_cnn, digits.train.x, "onnxruntime", FAST.replace(seed=7), progress=False)
    assert all(torch.equal(a[n].integers, b[n].integers) for n in a.layers)
    assert any(not torch.equal(a[n].integers, c[n].integers) for n in a.layers)


def test_defend_does_not_mutate_the_model(clean_cnn, digits):
    before = copy.deepcopy(clean_cnn.state_dict())
    defend(clean_cnn, digits.train.x, "onnxruntime", FAST, progress=False)
    assert all(torch.equal(before[k], v) for k, v in clean_cnn.state_dict().items())


def test_ablations_flip_only_flips_more_than_preserve_only(clean_cnn, digits):
    flip = defend(
        clean_cnn, digits.train.x, "onnxruntime", FAST.replace(objective="flip_only"), progress=False
    )
    keep = defend(
        clean_cnn, digits.train.x, "onnxruntime", FAST.replace(objective="preserve_only"), progress=False
    )
    assert flip.flipped_share > 0.6
    assert keep.flipped_share < flip.flipped_share / 2


def test_plan_integers_stay_on_the_grid_and_keep_each_channel_range(clean_cnn, digits):
    for scheme in (QuantScheme.onnxruntime(8), QuantScheme.torchao_x86(4), QuantScheme.reference(4)):
        plan = defend(clean_cnn, digits.train.x, scheme, FAST, progress=False)
        for lp in plan.layers.values():
            assert int(lp.integers.min()) >= scheme.qmin and int(lp.integers.max()) <= 255
            assert int((lp.integers - lp.nearest).abs().max()) <= 1  # a flip moves one step at most
            if scheme.range_rule == "absmax":  # the abs-max integer of every channel is untouched
                peak = lp.nearest.abs().flatten(1).max(dim=1).values
                assert torch.equal(lp.integers.abs().flatten(1).max(dim=1).values, peak)


def test_bounds_freeze_the_abs_max_element():
    w = torch.tensor([[0.5, -1.0, 0.2], [0.3, 0.1, 0.3]])
    scheme = QuantScheme.torchao_x86(8)
    s, z = scheme.qparams(w)
    lo, hi, frozen = learnable_bounds(w, scheme, s, z)
    assert frozen.tolist() == [[False, True, False], [True, False, True]]
    assert hi[0, 0] == 127 and lo[0, 0] == -127  # |q| <= floor(127.5): no learned integer outgrows the max


class _NoQuantizable(nn.Module):
    def forward(self, x):
        return x.flatten(1)


@pytest.mark.parametrize(
    "model_fn,data,message,error",
    [
        (
            lambda m: _NoQuantizable(),
            torch.rand(4, 1, 8, 8),
            r"has no Conv1d, Conv2d or Linear layer",
            ModelError,
        ),
        (lambda m: m, torch.rand(0, 1, 8, 8), r"empty \(0 images\)", DataError),
        (
            lambda m: m,
            torch.rand(4, 3, 8, 8),
            r"samples of shape \(3, 8, 8\) do not fit DigitsCNN",
            DataError,
        ),
        (lambda m: m, torch.rand(4, 8, 8), r"samples of shape \(8, 8\) do not fit DigitsCNN", DataError),
        (
            lambda m: _with_nan(m),
            torch.rand(4, 1, 8, 8),
            r"parameter 'features.0.0.weight' holds NaN",
            ModelError,
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(clean_cnn, model_fn, data, message, error):
    with pytest.raises(error, match=message):
        defend(model_fn(clean_cnn), data, "onnxruntime", FAST, progress=False)


def _with_nan(model):
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.features[0][0].weight[0, 0, 0, 0] = float("nan")
    return bad


def test_bits_and_config_validation_name_the_flag(clean_cnn, digits):
    with pytest.raises(EFRAPError, match=r"bits: expected an integer in 2\.\.8 \(--bits\), got 12"):
        defend(clean_cnn, digits.train.x, "onnxruntime", FAST, bits=12, progress=False)
    with pytest.raises(
        EFRAPError, match=r"EFRAPConfig.iters \(--iters\): expected a positive integer, got 0"
    ):
        EFRAPConfig(iters=0)
    with pytest.raises(EFRAPError, match=r"EFRAPConfig.objective: expected one of"):
        EFRAPConfig(objective="both")
    assert EFRAPConfig.from_dict(EFRAPConfig.reference().to_dict()) == EFRAPConfig.reference()
    assert EFRAPConfig.reference().iters == 10_000 and EFRAPConfig.reference().lr == 1e-3
    # a script's --efrap flag: some fields as JSON, the rest the defaults, validated as any config
    assert EFRAPConfig.from_json('{"budget": 0.5, "margin_cap": 4}') == EFRAPConfig(budget=0.5, margin_cap=4)
    for text, error in (
        ("[1]", r"expected a JSON object of fields, got '\[1\]'"),
        ("{bad", r"expected a JSON object of fields, got '\{bad' \(Expecting property name"),
        ('{"budgt": 1}', r"unknown fields \['budgt'\]"),
        ('{"budget": 150}', r"budget \(--budget\): expected a percentage in \[0, 100\]"),
    ):
        with pytest.raises(EFRAPError, match=error):
            EFRAPConfig.from_json(text)


def test_learn_rounding_rejects_nan_weights():
    scheme = QuantScheme.onnxruntime(8)
    with pytest.raises(EFRAPError, match=r"layer 'fc': weight holds NaN or Inf"):
        LayerProblem(
            "fc",
            torch.tensor([[float("nan"), 1.0]]),
            scheme,
            lambda x, w: x @ w.T,
            torch.rand(3, 2),
            torch.rand(3, 1),
        )


def test_a_layer_whose_inputs_or_float_outputs_overflow_is_refused():
    """Calibration data past float32's range made the loss NaN and a plan of arbitrary flips that
    verified (found by fuzzing efrap defend)."""
    scheme = QuantScheme.onnxruntime(8)
    overflow = torch.full((300, 2), float("inf"))  # past the first 256-row chunk checked
    overflow[:299] = 1.0
    for inputs, targets, what in (
        (overflow, torch.rand(300, 1), "inputs"),
        (torch.rand(300, 2), overflow[:, :1], "float outputs"),
    ):
        with pytest.raises(DataError, match=rf"layer 'fc': its {what} .*hold NaN or Inf"):
            LayerProblem("fc", torch.rand(1, 2), scheme, lambda x, w: x @ w.T, inputs, targets)


def test_a_layer_with_no_weights_or_no_outputs_is_refused():
    scheme = QuantScheme.onnxruntime(8)
    for weight, targets in ((torch.rand(0, 2), torch.rand(3, 1)), (torch.rand(1, 2), torch.rand(3, 0))):
        with pytest.raises(ModelError, match=r"layer 'fc': its weight \(\d, 2\) or its output per input"):
            LayerProblem("fc", weight, scheme, lambda x, w: x @ w.T, torch.rand(3, 2), targets)


def test_learn_rounding_flips_toward_the_targets_when_only_flipping():
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    scheme = QuantScheme.onnxruntime(4)
    x = torch.randn(64, 16)
    problem = LayerProblem("fc", w, scheme, lambda a, b: a @ b.T, x, x @ w.T)
    cfg = EFRAPConfig(
        iters=2000, objective="flip_only", budget=None
    )  # logits start up to 9.2 from 0 at lr 1e-2
    result = learn_rounding(problem, cfg, torch.Generator().manual_seed(0))
    nearest = scheme.quantize(w, result.scale, result.zero_point)
    _, _, frozen = learnable_bounds(w, scheme, result.scale, result.zero_point)
    err = (w / result.scale[:, None] - nearest).abs()
    worth = ~frozen & (err >= 0.05)  # error-guided: near-zero truncation errors carry no flip incentive
    assert bool((result.integers != nearest)[worth].all())
    assert bool((result.integers == nearest)[frozen].all())


def test_neuron_wise_error_norm_keeps_the_element_scale_under_the_lsb_balance():
    """The paper's per-channel norm ranks channels; under balance="lsb" it is an RMS, so a channel whose
    errors are all equal weighs exactly as the element-wise factor would (an L2 norm would be sqrt(fan-in)x)."""
    from efrap_plugin.objective import _flip_errors

    err = torch.tensor([[0.3] * 16, [0.1] * 8 + [0.4] * 8]).reshape(2, 4, 2, 2)
    rms = _flip_errors(err, EFRAPConfig(error_norm="neuron"))
    assert torch.allclose(rms[0], torch.full((4, 2, 2), 0.3))
    assert torch.allclose(rms[1], torch.full((4, 2, 2), (0.5 * (0.1**2 + 0.4**2)) ** 0.5))
    l2 = _flip_errors(err, EFRAPConfig(error_norm="neuron", balance="reference"))
    assert torch.allclose(l2[0], torch.full((4, 2, 2), 0.3 * 4.0))
    assert _flip_errors(err, EFRAPConfig()) is err


def test_scan_flags_no_layer_of_a_clean_model_and_leaves_scale_setters_out(clean_cnn):
    prepared = prepare_model(clean_cnn, QuantScheme.onnxruntime(8))
    weights = {n: m.weight for n, m in quantizable_layers(prepared)}
    for bits in (8, 4):
        rows = scan_weights(weights, QuantScheme.onnxruntime(bits))
        assert crowded_layers(rows) == []
        assert all(r.boundary_ks < 3 for r in rows), [(r.name, r.boundary_ks) for r in rows]
        assert "crowding" not in format_scan(rows)
    # at 4 bits onnxruntime's scale max/7.5 puts every channel's abs-max element exactly at frac 0.5:
    # counted in near_boundary, but not held against the model
    first = scan_weights({"w": weights["features.0.0"]}, QuantScheme.onnxruntime(4))[0]
    assert first.near_boundary >= 16 / 144 and not first.crowded
    # weights pushed to the bin edges are flagged, and so are weights held 0.1 steps inside them (outside
    # the 0.05-step band near_boundary counts): the test looks at the whole spread of errors
    w = weights["features.1.0"]
    scheme = QuantScheme.onnxruntime(8)
    scale, _ = scheme.qparams(w)
    s = scale.reshape(-1, 1, 1, 1)
    for frac, near in ((0.48, 1.0), (0.4, 0.0)):
        pushed = torch.where(scheme.scale_setters(w), w, (torch.floor(w / s) + frac) * s)
        row = scan_weights({"w": pushed}, scheme)[0]
        assert row.crowded and row.boundary_ks > 50
        assert abs(row.near_boundary - near) < 0.01


def test_mixed_layer_inputs_take_each_element_from_one_pass_or_the_other():
    from efrap_plugin import EFRAPError, pick_layer_inputs

    quantized, floating = torch.zeros(64, 8, 4, 4), torch.ones(64, 8, 4, 4)
    passes = {"quantized": quantized, "float": floating}
    asked: list[str] = []

    def capture(kind):
        asked.append(kind)
        return passes[kind]

    mixed = pick_layer_inputs("mixed", capture, torch.Generator().manual_seed(0))
    assert sorted(asked) == ["float", "quantized"]
    assert 0.45 < float(mixed.mean()) < 0.55 and bool(((mixed == 0) | (mixed == 1)).all())
    again = pick_layer_inputs("mixed", capture, torch.Generator().manual_seed(0))
    assert torch.equal(mixed, again)  # one seed, one mix
    asked.clear()
    assert pick_layer_inputs("float", capture, torch.Generator()) is floating and asked == ["float"]
    with pytest.raises(
        EFRAPError, match=r"layer_inputs: expected 'quantized', 'float' or 'mixed', got 'both'"
    ):
        pick_layer_inputs("both", capture, torch.Generator())


def test_mixing_over_the_float_inputs_gives_the_same_mix_without_new_memory():
    from efrap_plugin import mix_layer_inputs

    quantized, floating = torch.rand(200, 3, 5), torch.rand(200, 3, 5)
    apart = mix_layer_inputs(quantized, floating, torch.Generator().manual_seed(1))
    into = floating.clone()
    over = mix_layer_inputs(quantized, into, torch.Generator().manual_seed(1), out=into)
    assert over is into and torch.equal(over, apart)
    assert bool(((apart == quantized) | (apart == floating)).all())


def test_fused_adam_takes_torch_adams_steps_exactly():
    """learn_rounding's Adam is torch.optim.Adam(fused=True)'s kernel without the optimizer object:
    the same numbers, step for step."""
    from efrap_plugin.rounding import FusedAdam

    torch.manual_seed(0)
    start = torch.randn(5, 7)
    ours, theirs = start.clone(), start.clone().requires_grad_(True)
    adam, reference = FusedAdam(ours, 3e-2), torch.optim.Adam([theirs], lr=3e-2, fused=True)
    for _ in range(25):
        grad = torch.randn(5, 7)
        theirs.grad = grad.clone()
        adam.step(grad)
        reference.step()
        assert torch.equal(ours, theirs)
    assert float((ours - start).abs().min()) > 0  # every element moved


def test_the_loop_lets_go_of_a_layers_activations_before_the_next_is_captured():
    """A producer captures layer k + 1 while the loop waits: layer k's inputs and targets must be free
    by then (enumerate's reused result tuple once kept them: one layer's activations more at the peak)."""
    import weakref

    from efrap_plugin.loop import defend_layers

    torch.manual_seed(0)
    scheme = QuantScheme.onnxruntime(8)
    held: list[tuple[weakref.ref, weakref.ref]] = []
    alive_at_capture: list[bool] = []

    def problems():
        for k in range(3):
            alive_at_capture.append(any(r() is not None for pair in held for r in pair))
            x, w = torch.randn(64, 6), torch.randn(4, 6)
            problem = LayerProblem(f"fc{k}", w, scheme, lambda x, w: x @ w.t(), x, x @ w.t())
            held.append((weakref.ref(problem.inputs), weakref.ref(problem.targets)))
            yield problem
            del problem, x

    plans = defend_layers(problems(), EFRAPConfig(iters=20, calib_size=64, budget=None), 3, progress=False)
    assert list(plans) == ["fc0", "fc1", "fc2"] and alive_at_capture == [False, False, False]


def test_a_layers_batches_do_not_depend_on_how_the_layers_before_it_sampled():
    """Each layer samples from its own generator: an earlier layer that draws fewer or smaller batches
    (it stopped early, or has fewer inputs than a batch) leaves a later layer's rounding as it was, so an
    early stop is measured by its own effect, not by a reshuffle of every later layer's batches."""
    from efrap_plugin.loop import defend_layers

    torch.manual_seed(0)
    scheme = QuantScheme.onnxruntime(4)
    x, w = torch.randn(256, 24), torch.randn(12, 24)
    later = LayerProblem(
        "later", w, scheme, lambda x, w: x @ w.t(), x, x @ w.t() + 0.3 * torch.randn(256, 12)
    )
    config = EFRAPConfig(iters=200, lr=3e-2, batch_size=32, calib_size=256, budget=None)

    def first(rows: int) -> LayerProblem:
        xf, wf = torch.randn(rows, 6), torch.randn(4, 6)
        return LayerProblem("first", wf, scheme, lambda x, w: x @ w.t(), xf, xf @ wf.t())

    runs = [defend_layers([first(rows), later], config, 2, progress=False)["later"] for rows in (256, 8)]
    assert torch.equal(runs[0].integers, runs[1].integers)
    other = defend_layers([first(256), later], config.replace(seed=7), 2, progress=False)["later"]
    assert int((other.integers != runs[0].integers).sum()) > 0  # the sampling does reach the rounding


class _RowTokens(nn.Module):
    """A Linear over N x T x D tokens, as transformer blocks apply it."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = nn.Linear(8, 16)
        self.head = nn.Linear(16 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.rows(x)).flatten(1))


@pytest.mark.parametrize(
    "build, shape, layers",
    [
        (lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), (256, 64), ["0", "2"]),
        (_RowTokens, (256, 8, 8), ["rows", "head"]),
        (
            lambda: nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)),
            (256, 4, 16),
            ["0", "3"],
        ),
    ],
)
def test_calibration_inputs_of_any_shape_are_defended(build, shape, layers, tmp_path):
    """N x D (an MLP), N x T x D (Linear over tokens), N x C x L (Conv1d): not only images."""
    import numpy as np

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    plan = defend(model, x, "onnxruntime", FAST, progress=False)
    assert list(plan.layers) == layers
    np.savez(tmp_path / "calib.npz", x=x.numpy())  # the same from an .npz, as the CLI reads it
    again = defend(model, str(tmp_path / "calib.npz"), "onnxruntime", FAST, progress=False)
    assert all(torch.equal(plan[k].integers, again[k].integers) for k in layers)


def test_patience_ends_a_layer_once_its_integers_are_stable(clean_cnn, digits):
    """Off by default (every layer runs all iters); with patience a layer stops once its hard-rounded
    integers have not moved for that many steps; ``settle`` lets a small share still move, which ends
    the large layers too (at 1,000 steps they keep moving about 1% per 50 steps)."""
    full = defend(clean_cnn, digits.train.x, "onnxruntime", FAST.replace(iters=600), progress=False)
    assert {lp.stats["steps"] for lp in full.layers.values()} == {600}
    early = defend(
        clean_cnn, digits.train.x, "onnxruntime", FAST.replace(iters=600, patience=50), progress=False
    )
    steps = [lp.stats["steps"] for lp in early.layers.values()]
    assert all(s % 50 == 0 and 100 <= s <= 600 for s in steps) and min(steps) < 600
    settled = defend(
        clean_cnn,
        digits.train.x,
        "onnxruntime",
        FAST.replace(iters=600, patience=50, settle=0.05),
        progress=False,
    )
    loose = [lp.stats["steps"] for lp in settled.layers.values()]
    assert all(a <= b for a, b in zip(loose, steps)) and max(loose) < 600
    for layer in settled.layers.values():  # ended early, still a learned rounding on the grid
        assert layer.stats["act_error_learned"] <= 2 * layer.stats["act_error_nearest"]
    with pytest.raises(EFRAPError, match=r"EFRAPConfig.patience \(--patience\): expected steps >= 0, got -1"):
        EFRAPConfig(patience=-1)
    with pytest.raises(
        EFRAPError, match=r"EFRAPConfig.settle \(--settle\): expected a share in \[0, 1\), got 1"
    ):
        EFRAPConfig(settle=1)


def test_small_work_runs_on_one_thread_and_the_count_is_restored():
    from efrap_plugin.threads import SMALL_WORK_FLOPS, forward_flops, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads_for(SMALL_WORK_FLOPS / 10):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads_for(SMALL_WORK_FLOPS * 10):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    # a Linear 64 -> 10 on one sample: 640 multiply-adds
    assert forward_flops(nn.Linear(64, 10), torch.zeros(1, 64)) == 2 * 640


def test_a_device_this_machine_lacks_is_a_clear_error_before_any_work(clean_cnn, digits):
    with pytest.raises(EFRAPError, match=r"device: 'cuda:99' is not usable here .* pass 'cpu'"):
        defend(clean_cnn, digits.train.x[:64], "onnxruntime", FAST.replace(device="cuda:99"), progress=False)
    cpu = defend(clean_cnn, digits.train.x, "onnxruntime", FAST.replace(device="cpu"), progress=False)
    default = defend(clean_cnn, digits.train.x, "onnxruntime", FAST, progress=False)
    assert all(torch.equal(cpu[k].integers, default[k].integers) for k in default.layers)


@pytest.mark.parametrize(
    "beta, share, rectifier, penalty",
    [
        (2.0, None, "sigmoid", True),
        (7.5, None, "sigmoid", True),
        (2.0, 0.3, "sigmoid", True),
        (2.0, None, "stretched", True),
        (2.0, None, "sigmoid", False),
    ],
)
def test_objective_terms_and_gradients_match_the_reference_formulas(beta, share, rectifier, penalty):
    """The step's gradient (autograd through the layer alone, h(V), soft weight, L_F and L_P chained in
    closed form) is autograd's through the reference code's losses: soft weight, BCE with logs, masked L_P."""
    # int4: a channel's absmax element rounds to -8 while every other element is bounded to [-7, 7]
    from efrap_plugin.objective import BCE_EPS, Objective, rectify

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(16, 3, 6, 6)
    scheme = QuantScheme.onnxruntime(4)
    problem = LayerProblem(
        "c",
        conv.weight.detach().clone(),
        scheme,
        lambda a, w: nn.functional.conv2d(a, w),
        x,
        conv(x).detach(),
    )
    objective = Objective.build(
        problem, EFRAPConfig(rectifier=rectifier, budget=None), torch.Generator().manual_seed(0)
    )
    if share is not None:
        objective.force_flips(share)
        assert 0 < int(objective.free.sum()) < int(objective.learnable.sum())
    v = torch.randn_like(problem.weight) * 3
    v.view(-1)[:4] = torch.tensor([40.0, -40.0, 20.0, -20.0])  # h is exactly 1 or 0 in float32 here
    v.requires_grad_(True)
    idx = torch.arange(16)
    fused = objective.terms(v, idx, beta)
    step = objective.gradient(v.detach(), idx, beta, with_penalty=penalty)  # what an optimizer step uses
    with torch.no_grad():  # a caller's no_grad does not break the step
        assert torch.equal(objective.gradient(v.detach(), idx, beta, with_penalty=penalty), step)
    # the optimizer's buffer, reused step after step (and the objective's own temporaries) change nothing
    buffer = torch.full_like(step, float("nan"))
    for _ in range(2):
        got = objective.gradient(v.detach(), idx, beta, with_penalty=penalty, out=buffer)
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(got, step)

    o = objective
    ref_v = v.detach().clone().requires_grad_(True)
    h = rectify(ref_v, rectifier)
    # the elements not learned sit at their own integer, even outside the learned bounds (an int4
    # absmax scale setter rounds to -8 where the others stop at -7)
    q = torch.where(o.free, torch.minimum(torch.maximum(o.base + h + o.z, o.lo), o.hi), o.fixed)
    y = problem.forward(x, (q - o.z) * o.s)
    l_a = (y - problem.targets).pow(2).sum(dim=1).mean() * o.act_scale
    t = o.target
    bce = -(t * torch.log(h + BCE_EPS) + (1 - t) * torch.log(1 - h + BCE_EPS))
    l_f = o.flip_scale * (o.err * bce * o.free).sum()
    l_p = 0.01 * (1 - (2 * h - 1).abs().pow(beta))[o.free].sum() * o.flip_scale
    reference = (l_a, l_f, l_p)
    ref_grads = torch.autograd.grad(l_a + l_f + (l_p if penalty else 0), ref_v)[0]
    for got, want in zip(fused, reference):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), (got, want)
    assert float(ref_grads.abs().max()) > 1e-3  # the comparison below is not between zeros
    assert all(bool(torch.isfinite(t).all()) for t in (*fused, step))
    assert torch.allclose(step, ref_grads, rtol=1e-3, atol=1e-7)
    assert bool(((o.fixed < o.lo) & ~o.free).any())  # the case above occurs in this layer


@pytest.mark.parametrize("scheme", ["onnxruntime", "torchao-x86"])
def test_a_conv_transpose_is_learned_where_the_backend_quantizes_it_and_named_where_not(
    digits, caplog, scheme
):
    """onnxruntime quantizes a ConvTranspose (per channel along its output channels): the torch path learns
    it. X86Inductor leaves it in float: the torch path warns, names it in the plan with where it is
    learned, and learns the layers around it."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Flatten(),
        nn.Linear(128, 10),
    ).eval()
    config = EFRAPConfig(iters=20, calib_size=128)
    with caplog.at_level("WARNING", logger="efrap_plugin"):
        plan = defend(model, digits.train.x[:128], scheme, config=config, progress=False)
    if scheme == "onnxruntime":
        assert list(plan.layers) == ["0", "2", "4"] and plan.meta.skipped == {}
        assert plan["2"].integers.shape == (2, 4, 3, 3) and "ConvTranspose2d" not in caplog.text
        return
    assert list(plan.layers) == ["0", "4"] and list(plan.meta.skipped) == ["2"]
    assert plan.meta.skipped["2"].startswith(
        "ConvTranspose2d: the torch path learns Conv1d / Conv2d / Linear"
    )
    assert "(quantize_static)" in caplog.text and "2: ConvTranspose2d" in caplog.text
