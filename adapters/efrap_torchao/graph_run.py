"""One pass of a PT2E graph over the calibration data, advanced only as far as the per-layer loop asks.

Capturing each layer's inputs by running the graph from its start costs a forward pass per layer
(quadratic in depth: 292 s for MobileNetV2 on 256 images, benchmarks/results/scale.md). Here the graph
runs once: each request executes the nodes up to the one asked for and keeps every value a later node
still needs. The loop installs a layer's learned weights before it asks for anything past that layer,
and the graph reads weights afresh at each use (get_attr nodes and the observers over them are never
kept), so the values downstream are those of the partially quantized model, as a run from the start
would give.
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
    by a run from the start. The tensor returned is shared with the run's own state: read it, do not
    write to it."""

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
        whole = torch.cat([env[node].detach() for env in self.envs])
        at = 0
        for env in self.envs:  # the run keeps views of the one copy returned, not a second copy
            rows = env[node].shape[0]
            env[node] = whole[at : at + rows]
            at += rows
        return whole

    def _step(self) -> None:
        node, i = self.nodes[self.position], self.position
        self.position += 1
        if node.op in ("placeholder", "output") or node in self.fresh:
            return
        for env in self.envs:
            env[node] = self._run(node, env)
            for arg in node.all_input_nodes:  # drop what no later node reads
                if self.last_use.get(arg) == i and arg.op != "placeholder":
                    env.pop(arg, None)

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
