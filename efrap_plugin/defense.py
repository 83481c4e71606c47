"""``run``: the one defense skeleton every route shares.

A route is a ``LayerProducer`` (efrap_plugin.producer); ``run`` settles the config's choices against
what the producer honours, reads and splits the calibration data, names what is skipped, runs the
per-layer loop and writes the plan with its metadata. A new route is a new producer, not a new copy
of these steps.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .config import EFRAPConfig
from .errors import EFRAPError
from .held_out import held_out_indices, inputs_needed
from .loop import defend_layers, warn_tied_weights
from .plan import PlanMeta, RoundingPlan
from .producer import LayerProducer

__all__ = ["resolve_config", "run", "with_layer_inputs"]

log = logging.getLogger(__name__)


def resolve_config(producer: LayerProducer, config: EFRAPConfig | None) -> EFRAPConfig:
    """``config`` with the producer's own ``layer_inputs`` and ``unit`` where it leaves them None; a
    choice the producer cannot carry out is refused with its reason, before any work."""
    config = config or EFRAPConfig()
    if not isinstance(config, EFRAPConfig):
        raise EFRAPError(f"config: expected an EFRAPConfig, got {type(config).__name__}")
    honours = producer.honours
    chosen = {}
    for name, allowed in (("layer_inputs", honours.layer_inputs), ("unit", honours.units)):
        value = getattr(config, name)
        if value is None:
            chosen[name] = allowed[0]
        elif value not in allowed:
            why = honours.why_not.get(name, "")
            raise EFRAPError(
                f"EFRAPConfig.{name}={value!r}: the {producer.flow} route carries out "
                f"{' or '.join(repr(a) for a in allowed)}{f' ({why})' if why else ''}; "
                f"set {name}={allowed[0]!r} or leave it None"
            )
    return config.replace(**chosen)


def with_layer_inputs(config: EFRAPConfig | None, layer_inputs: str | None) -> EFRAPConfig | None:
    """``config`` with the ``layer_inputs=`` shorthand of an entry point applied (None: as it is); a
    shorthand that contradicts the config's own choice is refused."""
    if layer_inputs is None:
        return config
    config = config or EFRAPConfig()
    if config.layer_inputs not in (None, layer_inputs):
        raise EFRAPError(
            f"layer_inputs={layer_inputs!r} and config.layer_inputs={config.layer_inputs!r} disagree; give one"
        )
    return config.replace(layer_inputs=layer_inputs)


def run(
    producer: LayerProducer, calib_data: Any, config: EFRAPConfig | None = None, *, progress: bool = True
) -> RoundingPlan:
    """Learn the rounding of every layer ``producer`` finds, from ``calib_data``; the plan.

    Budget mode holds inputs out of the optimisation (``held_out_indices``) and measures the producer's
    partially quantized model on them; without it every input read goes to the optimisation.
    """
    config = resolve_config(producer, config)
    start = time.perf_counter()
    with producer.running():
        calib = producer.calibration(calib_data, inputs_needed(config))
        found = producer.find_layers(calib, config)
        for name, reason in found.skipped.items():
            log.warning("%s: %s", name, reason)
        warn_tied_weights(found.readers)
        learned, used = {}, 0
        if found.names:
            fit, held = held_out_indices(producer.rows(calib), config, lambda: producer.float_outputs(calib))
            calib, held = producer.take(calib, fit), producer.take(calib, held)
            problems = producer.problems(calib, config)
            held_out = (lambda: producer.held_out(held)) if config.budget is not None else None
            learned = defend_layers(problems, config, len(found.names), progress, held_out)
            used = producer.rows(calib)
        produced = producer.finish(learned)
    log.info("EFRAP: %d layers in %.1f s", len(learned), time.perf_counter() - start)
    meta = PlanMeta(  # no timings: the same inputs give the same plan file
        config=config.to_dict(),
        flow=producer.flow,
        calib_size=used,
        skipped=dict(found.skipped),
        constants=dict(found.constants),
        grids=dict(produced.grids),
        layout=None if produced.layout is None else dict(produced.layout),
    )
    return RoundingPlan(produced.scheme, dict(produced.layers), producer.source, meta)
