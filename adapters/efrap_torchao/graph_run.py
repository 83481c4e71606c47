"""One pass of a PT2E graph over the calibration data, advanced only as far as the per-layer loop asks.

Capturing each layer's inputs by running the graph from its start costs a forward pass per layer
(quadratic in depth: 292 s for MobileNetV2 on 256 images, benchmarks/results/scale.md). Here the graph
runs once: each request executes the nodes up to the one asked for and keeps every value a later node
still needs. The loop installs a layer's learned weights before it asks for anything past that layer,
and the graph reads weights afresh at each use (get_attr nodes and the observers over them are never
kept), so the values downstream are those of the partially quantized model, as a run from the start
would give.

Each batch-shaped value is written, chunk by chunk, into one tensor for all calibration inputs (the
chunks' environments hold views of it): asking for a node returns that tensor without a copy, and a
node's value takes its own size once, never twice while chunks are joined (ResNet-18 on 1,024 inputs
held 256 MiB more per request when the chunks were concatenated).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from efrap_plugin import ModelError

__all__ = ["GraphRun"]


class GraphRun:
    """``value(name)``: the node's value for every calibration input, executing the graph no further
    than that node. A value already dropped (asked for after every node reading it ran) is recomputed
    by a run from the start. The tensor returned is shared with the run's own state: read it, and write
    to it only once ``holds`` says the run has let it go."""

    def __init__(
        self,
        gm: fx.GraphModule,
        calib: torch.Tensor,
        chunk: int,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.gm, self.context, self.calib, self.chunk = gm, context, calib, chunk
        self.nodes = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ModelError(
                f"model: the exported graph takes {len(placeholders)} inputs; defend_prepared feeds one"
            )
        self.envs: list[dict[fx.Node, Any]] = [{placeholders[0]: x} for x in calib.split(chunk)]
        self.fresh = {n for n in self.nodes if n.op == "get_attr"}
        self.fresh |= {  # weight observers: they pass the weight through, so they are read at each use too
            n
            for n in self.nodes
            if n.op == "call_module" and n.all_input_nodes and set(n.all_input_nodes) <= self.fresh
        }
        self.last_use: dict[fx.Node, int] = {}
        for i, node in enumerate(self.nodes):
            for arg in node.all_input_nodes:
                self.last_use[arg] = i
        self.position = 0
        self.whole: dict[fx.Node, torch.Tensor] = {}  # batch-shaped values, all inputs' rows in one tensor
        self.rows = [env[placeholders[0]].shape[0] for env in self.envs]
        if calib.is_contiguous():
            self.whole[placeholders[0]] = calib
        self.by_name = {n.name: (i, n) for i, n in enumerate(self.nodes)}

    def value(self, name: str) -> torch.Tensor:
        index, node = self.by_name[name]
        if node not in self.envs[0] and index < self.position:
            return GraphRun(self.gm, self.calib, self.chunk, self.context).value(name)
        with torch.no_grad(), self.context():
            while node not in self.envs[0]:
                if self.position == len(self.nodes):
                    raise ModelError(f"model: graph node {name} never ran")
                self._step()
        if node in self.whole:
            return self.whole[node]
        return torch.cat([env[node].detach() for env in self.envs])  # not batch-shaped in every chunk

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether the run's state (or the calibration inputs it was given) uses ``tensor``'s memory."""
        mine = {self.calib.untyped_storage().data_ptr()}
        mine |= {t.untyped_storage().data_ptr() for t in self.whole.values()}
        for env in self.envs:
            mine |= {v.untyped_storage().data_ptr() for v in env.values() if isinstance(v, torch.Tensor)}
        return tensor.untyped_storage().data_ptr() in mine

    def _step(self) -> None:
        node, i = self.nodes[self.position], self.position
        self.position += 1
        if node.op in ("placeholder", "output") or node in self.fresh:
            return
        whole, shared, at = None, None, 0
        for k, (env, rows) in enumerate(zip(self.envs, self.rows)):
            value = self._run(node, env)
            if k == 0:
                whole, shared = self._whole_for(node, value, env)
            if whole is not None and not self._fits(value, whole[at : at + rows], env, shared):
                whole = None  # not batch-shaped after all: each chunk keeps a value of its own
                for done in self.envs[:k]:
                    done[node] = done[node].clone()
            if whole is not None and shared is None:
                whole[at : at + rows].copy_(value)
                value = whole[at : at + rows]
            env[node] = value
            at += rows
            for arg in node.all_input_nodes:  # drop what no later node reads
                if self.last_use.get(arg) == i and arg.op != "placeholder":
                    env.pop(arg, None)
        if whole is not None:
            self.whole[node] = whole
        for arg in node.all_input_nodes:
            if self.last_use.get(arg) == i:
                self.whole.pop(arg, None)

    def _whole_for(
        self, node: fx.Node, value: Any, env: dict[fx.Node, Any]
    ) -> tuple[torch.Tensor | None, fx.Node | None]:
        """The tensor to hold ``node``'s value for every input (None where the value is not a contiguous
        batch-shaped tensor), and the input node whose tensor it shares when ``node`` passes that input
        through (an observer that does not fake-quantize, an in-place op)."""
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != self.rows[0]:
            return None, None
        for arg in node.all_input_nodes:
            if arg in self.whole and env.get(arg) is value:
                return self.whole[arg], arg
        if not value.is_contiguous():
            return None, None
        return value.new_empty((sum(self.rows), *value.shape[1:])), None

    @staticmethod
    def _fits(value: Any, rows: torch.Tensor, env: dict[fx.Node, Any], shared: fx.Node | None) -> bool:
        if shared is not None:
            return env.get(shared) is value
        return (
            isinstance(value, torch.Tensor)
            and value.shape == rows.shape
            and value.dtype == rows.dtype
            and value.is_contiguous()
        )

    def _get(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        return self._run(node, env) if node in self.fresh else env[node]

    def _run(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        if node.op == "get_attr":
            target: Any = self.gm
            for part in node.target.split("."):
                target = getattr(target, part)
            return target
        args = fx.node.map_arg(node.args, lambda a: self._get(a, env))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: self._get(a, env))
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise ModelError(f"model: graph node {node.name} has op {node.op!r}, which GraphRun does not run")
