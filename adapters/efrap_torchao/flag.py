"""EFRAP as a torchao PT2E config flag: the user's own prepare_pt2e -> calibration -> convert_pt2e,
unchanged but for the quantizer they pass, writes EFRAP's integers.

``EFRAPQuantizer(quantizer)`` annotates exactly as the user's quantizer does. At prepare it adds a
recorder after the model's input (a bounded sample of the calibration inputs the user feeds) and gives
every observer the quantizer created a ``convert`` method, which torchao's convert calls in place of its
own conversion. The first such call, on the still intact prepared model, runs ``defend_prepared``'s
producer on the recorded inputs and snaps the weights; every observer then converts as torchao's own
code does, so the int8 constants convert folds are the plan's integers. ``with_efrap(config)`` marks the
QuantizationConfigs whose layers EFRAP learns (default: every layer the quantizer observes).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import torch
from torch import nn
from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase
from torchao.quantization.pt2e.quantizer import Quantizer

from efrap_plugin import RoundingPlan
from efrap_plugin.config import EFRAPConfig
from efrap_plugin.defense import run
from efrap_plugin.errors import DataError, EFRAPError, ModelError
from efrap_plugin.held_out import inputs_needed

from .observed import ObservedModelProducer

__all__ = ["EFRAPQuantizer", "with_efrap"]

log = logging.getLogger(__name__)

_RECORDER = "efrap_input_recorder"


class _Session:
    """One prepared model's flag state: the recorded inputs, the observers given a ``convert``, and the
    plan once learned. Shared, never copied: the defense deep-copies the prepared model for its float
    copy, and that copy's observers and recorder must point here too."""

    def __init__(self, config: EFRAPConfig, progress: bool, owner: EFRAPQuantizer) -> None:
        self.config = config
        self.progress = progress
        self.owner = owner
        self.limit = inputs_needed(config)
        self.rows: list[torch.Tensor] = []
        self.recorded = 0
        self.recording = True
        self.observers: list[tuple[nn.Module, type]] = []  # each with its class before the flag's
        self.plan: RoundingPlan | None = None

    def __deepcopy__(self, memo: dict) -> _Session:
        return self

    def record(self, x: torch.Tensor) -> None:
        if not self.recording or self.recorded >= self.limit or not isinstance(x, torch.Tensor):
            return
        rows = x.detach()[: self.limit - self.recorded].clone()
        self.rows.append(rows)
        self.recorded += rows.shape[0]

    def defend(self, model: torch.fx.GraphModule) -> None:
        """Learn on the intact prepared model (once), then hand every observer back its own class."""
        if self.plan is not None:
            return
        self.recording = False
        if not self.rows:
            raise DataError(
                "EFRAPQuantizer recorded no calibration inputs: run your calibration batches through the "
                "prepared model (with torch.no_grad()) before convert_pt2e"
            )
        calib = torch.cat(self.rows)
        self.rows = []
        marked = any(getattr(obs, "_efrap_asked", False) for obs, _ in self.observers)
        asked = (lambda obs: bool(getattr(obs, "_efrap_asked", False))) if marked else None
        log.info("EFRAP at convert_pt2e: learning on %d recorded calibration inputs", calib.shape[0])
        try:
            self.plan = run(
                ObservedModelProducer(model, asked=asked), calib, self.config, progress=self.progress
            )
        finally:
            for observer, cls in self.observers:
                observer.__class__ = cls
        self.owner.plan = self.plan


def _convert_as_torchao(model: torch.fx.GraphModule, node: torch.fx.Node, observer: nn.Module) -> None:
    """What torchao's convert does with an observer that has no ``convert`` of its own."""
    try:
        from torchao.quantization.pt2e.convert import (
            _replace_observer_with_quantize_dequantize_node_decomposed,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installed torchao
        raise EFRAPError(
            "EFRAPQuantizer needs torchao's PT2E convert (torchao.quantization.pt2e.convert, torchao>=0.10); "
            f"this torchao has none ({exc}); call defend_prepared between calibration and convert_pt2e instead"
        ) from None
    attrs = model.meta["_observed_graph_module_attrs"]
    _replace_observer_with_quantize_dequantize_node_decomposed(
        model,
        node,
        {node.target: observer},
        attrs.node_name_to_scope,
        attrs.node_name_to_qconfig,
        next(iter(model.parameters()), torch.empty(0)).device,
    )


class _FlagObserver:
    """Mixed in before an observer's own class: forward checks the flag is wired, convert learns first."""

    _efrap_session: _Session | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._efrap_session is None:
            raise EFRAPError(
                f"{type(self).__name__} comes from with_efrap(QuantizationConfig), but the quantizer given to "
                "prepare_pt2e is not wrapped: pass EFRAPQuantizer(your_quantizer), which records the "
                "calibration inputs EFRAP learns from"
            )
        return super().forward(x)

    def convert(self, model: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        if self._efrap_session is None:
            raise EFRAPError("with_efrap(...) observers convert only under EFRAPQuantizer(your_quantizer)")
        self._efrap_session.defend(model)  # hands every observer, this one too, its own class back
        _convert_as_torchao(model, node, self)


@functools.cache
def _flag_class(cls: type) -> type:
    """``cls`` with the flag's forward and convert; its name kept (torchao reads "PerChannel" from it)."""

    def __init__(self, *args: Any, efrap_asked: bool = False, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self._efrap_asked = efrap_asked

    return type(cls.__name__, (_FlagObserver, cls), {"__init__": __init__, "__module__": cls.__module__})


class _InputRecorder(ObserverBase):
    """The node after the model's input: records the calibration inputs. An observer to torchao, so
    that its convert calls ``convert``, which learns (if no observer did first) and removes it."""

    def __init__(self, session: _Session) -> None:
        super().__init__(dtype=torch.float32)
        self.session = session

    def calculate_qparams(self) -> None:  # an observer's abstract method; it has no grid
        return None

    def forward(self, x: Any) -> None:
        self.session.record(x)

    def convert(self, model: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        self.session.defend(model)
        model.graph.erase_node(node)
        delattr(model, node.target)


def with_efrap(config: Any) -> Any:
    """``config`` (a torchao QuantizationConfig), its layers marked for EFRAP under ``EFRAPQuantizer``.

    The weight spec keeps the user's observer, its arguments and grid; only its class gains the flag's
    ``convert``. Set per module name / type as the quantizer allows (``set_module_name``, ...): when any
    config is marked, EFRAP learns just those layers and names the rest in the plan.
    """
    weight = getattr(config, "weight", None)
    ctor = getattr(weight, "observer_or_fake_quant_ctr", None)
    if ctor is None:
        raise EFRAPError(
            f"with_efrap: expected a QuantizationConfig with a weight spec, got {type(config).__name__}; "
            "EFRAP learns weights, so the config must quantize them"
        )
    func = getattr(getattr(ctor, "p", None), "func", ctor)
    keywords = dict(getattr(getattr(ctor, "p", None), "keywords", {}))
    marked = _flag_class(func).with_args(**keywords, efrap_asked=True)
    return dataclasses.replace(config, weight=dataclasses.replace(weight, observer_or_fake_quant_ctr=marked))


def _refuse_unlearnable(observers: list[nn.Module]) -> None:
    if any(isinstance(obs, FakeQuantizeBase) for obs in observers):
        raise EFRAPError(
            "EFRAPQuantizer: the model was prepared for quantization-aware training (fake-quantize modules); "
            "EFRAP learns a post-training rounding: pass it to prepare_pt2e, not prepare_qat_pt2e"
        )
    dynamic = [type(obs).__name__ for obs in observers if getattr(obs, "is_dynamic", False)]
    if dynamic:
        raise EFRAPError(
            f"EFRAPQuantizer: the quantizer asks for dynamic activation quantization ({dynamic[0]}); EFRAP learns "
            "from calibrated activation grids, which dynamic quantization does not have. Use a static config "
            "(is_dynamic=False)"
        )


def _one_input(model: torch.fx.GraphModule) -> torch.fx.Node:
    placeholders = [node for node in model.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise ModelError(
            f"EFRAPQuantizer: the exported model takes {len(placeholders)} inputs; the flag records one input "
            "tensor. Call defend_prepared(prepared, calibration_inputs) between calibration and convert_pt2e"
        )
    return placeholders[0]


class EFRAPQuantizer(Quantizer):
    """The user's quantizer, with EFRAP at ``convert_pt2e``.

    ``EFRAPQuantizer(X86InductorQuantizer().set_global(config))`` annotates as the quantizer does; the
    user's prepare_pt2e, calibration loop and convert_pt2e then write the plan's integers (the same as
    ``defend_prepared`` on the first ``calib_size`` calibration inputs fed). ``plan`` holds the plan
    learned at the last convert, for ``verify_pt2e`` and saving.
    """

    def __init__(
        self, quantizer: Quantizer, config: EFRAPConfig | None = None, *, progress: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(quantizer, Quantizer):
            raise EFRAPError(
                "EFRAPQuantizer: expected a torchao PT2E Quantizer (X86InductorQuantizer, XNNPACKQuantizer, "
                f"...), got {type(quantizer).__name__}"
            )
        self.quantizer = quantizer
        self.config = config if config is not None else EFRAPConfig()
        self.progress = progress
        self.plan: RoundingPlan | None = None

    def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return self.quantizer.transform_for_annotation(model)

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return self.quantizer.annotate(model)

    def validate(self, model: torch.fx.GraphModule) -> None:
        self.quantizer.validate(model)

    def prepare_obs_or_fq_callback(
        self, model: torch.fx.GraphModule, edge_or_node_to_obs_or_fq: dict
    ) -> None:
        """Every observer gains the flag's convert; a recorder goes after the model's input."""
        self.quantizer.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)
        source = _one_input(model)
        observers = [
            obs for obs in {id(o): o for o in edge_or_node_to_obs_or_fq.values()}.values() if obs is not None
        ]
        _refuse_unlearnable(observers)
        session = _Session(self.config, self.progress, self)
        for observer in observers:
            own = type(observer).__bases__[1] if isinstance(observer, _FlagObserver) else type(observer)
            session.observers.append((observer, own))
            observer.__class__ = _flag_class(own)
            observer._efrap_session = session
        model.add_submodule(_RECORDER, _InputRecorder(session))
        with model.graph.inserting_after(source):
            model.graph.call_module(_RECORDER, (source,))
