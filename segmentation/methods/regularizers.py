"""EWC, PI and RW: parameter regularizers whose importance statistics carry from step to step in the artifact.

Written from the papers and MiB's implementation (github.com/fcdl94/MiB, utils/regularizer.py). At a step t > 0
the penalty is sum_theta F_theta (theta - theta*)^2 over the parameters the old model has, theta* its values, F the
importance gathered while training the previous steps, each tensor rescaled to [0, 1] ((F - min) / (max - min),
unless --reg_no_normalize). The importances:
  EWC (Kirkpatrick et al.): running mean of squared gradients, F <- alpha g^2 + (1 - alpha) F (--reg_alpha),
      started at ones, never reset between steps;
  PI  (Zenke et al., "path integral" / synaptic intelligence): each step adds
      max(0, sum_iterations g * (theta_prev - theta) / ((theta_end - theta_start)^2 + 1e-20)) to the score;
  RW  (Riemannian Walk, Chaudhry et al.): every --reg_iterations iterations, g * dtheta / (F dtheta^2 / 2 + 1e-8)
      is summed into a score (clipped at 0 and averaged with the previous steps' score); the penalty weighs
      normalised score + normalised Fisher, the Fisher kept as EWC's.
Statistics are updated on every rank from the gradients after DDP's all-reduce, so every rank holds the same
statistics. MiB updates them on rank 0 only, which gives the same result: every rank's penalty reads the weights
built from the previous step's checkpoint, which do not change during the step, and only rank 0 saves the
statistics the next step starts from. The penalty's gradient 2 F (theta - theta*) is added after the statistics
have read the gradient of the losses, as MiB back-propagates the penalty separately; `penalty()` returns its value
for the log, without a graph.

State: `carry_state()` is what the next step needs (EWC and RW: the Fisher, PI and RW: the score), kept in the
step's artifact; `carry_over` starts a step from it. `state_dict()` is the running statistics of this step, kept in
run states; `load_state_dict` restores them on resume (after `carry_over`, which the step always calls first).
The method (distillation.py) keeps them by regularizer name in the artifact: step 0 gathers all three, so one step
0 serves EWC, PI and RW.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

EPS = 1e-8


def cloned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in tensors.items()}


@torch.no_grad()
def update_fisher(fisher: dict[str, torch.Tensor], grads: Iterator[tuple[str, nn.Parameter, torch.Tensor]],
                  alpha: float) -> None:
    """F <- alpha g^2 + (1 - alpha) F, in place: once per iteration over every parameter, so no new tensor."""
    for n, _, g in grads:
        fisher[n].mul_(1 - alpha).addcmul_(g, g, value=alpha)


def normalized(t: torch.Tensor) -> torch.Tensor:
    """(t - min) / (max - min + 1e-8), per tensor (MiB's normalize_fn)."""
    return (t - t.min()) / (t.max() - t.min() + EPS)


class ParameterRegularizer:
    """The shared bookkeeping: the trained parameters by name, the old values theta*, the penalty's importances."""

    name = "base"

    def __init__(self, model: nn.Module, teacher: nn.Module | None, options: Any) -> None:
        self.model = model
        self.normalize = not options.reg_no_normalize
        self.alpha = options.reg_alpha
        self.iterations = options.reg_iterations
        self.old: dict[str, torch.Tensor] = {}
        if teacher is not None:
            self.old = {n: p.detach().clone() for n, p in teacher.named_parameters()}
        self.importance: dict[str, torch.Tensor] = {}  # the penalty's weights; empty: nothing to penalise yet

    def params(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def grads(self) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
        return ((n, p, p.grad) for n, p in self.params() if p.grad is not None)

    @property
    def penalizes(self) -> bool:
        return bool(self.importance) and bool(self.old)

    def _penalized(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.params() if n in self.old and n in self.importance)

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for n, p in self._penalized():
            total = total.to(p.device) + (self.importance[n] * (p - self.old[n]).pow(2)).sum().float()
        return total

    @torch.no_grad()
    def add_penalty_gradient(self, weight: float) -> None:
        """p.grad += weight * 2 F (theta - theta*), the gradient of weight * penalty."""
        for n, p in self._penalized():
            if p.grad is not None:
                p.grad.add_(self.importance[n] * (p - self.old[n]), alpha=2.0 * weight)

    def update(self) -> None:
        raise NotImplementedError

    def carry_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def carry_over(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def check_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            found = state.get("name") or "no regularizer statistics"
            raise ValueError(f"--regularizer {self.name}: the previous step's artifact holds {found}; train the "
                             f"previous steps with --regularizer {self.name} too (its statistics are gathered "
                             f"while they train)")

    def prepared(self, t: torch.Tensor) -> torch.Tensor:
        return normalized(t) if self.normalize else t


class EWC(ParameterRegularizer):
    name = "ewc"

    def __init__(self, model: nn.Module, teacher: nn.Module | None, options: Any) -> None:
        super().__init__(model, teacher, options)
        self.fisher = {n: torch.ones_like(p) for n, p in self.params()}

    @torch.no_grad()
    def update(self) -> None:
        update_fisher(self.fisher, self.grads(), self.alpha)

    def carry_state(self) -> dict[str, Any]:
        return {"name": self.name, "fisher": dict(self.fisher)}

    def state_dict(self) -> dict[str, Any]:
        return self.carry_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.fisher = cloned(state["fisher"])  # updated in place from here on

    def carry_over(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.importance = {n: self.prepared(f) for n, f in state["fisher"].items()}
        self.fisher.update({n: f.clone() for n, f in state["fisher"].items()})  # new parameters keep their ones


class PI(ParameterRegularizer):
    name = "pi"

    def __init__(self, model: nn.Module, teacher: nn.Module | None, options: Any) -> None:
        super().__init__(model, teacher, options)
        # theta when training starts (taken at the first update, after a method's classifier init)
        self.start: dict[str, torch.Tensor] = {}
        self.delta = {n: torch.zeros_like(p) for n, p in self.params()}
        self.previous: dict[str, torch.Tensor] = {}  # theta at the last update
        self.score_before: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self) -> None:
        if not self.start:
            self.start = {n: p.detach().clone() for n, p in self.params()}
        for n, p, g in self.grads():
            previous = self.previous.get(n)
            if previous is None:
                self.previous[n] = p.detach().clone()
                continue
            self.delta[n].addcmul_(g, previous.sub_(p))  # delta += g * (theta_prev - theta), no new tensor
            previous.copy_(p)

    @torch.no_grad()
    def score(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, p in self.params():
            start = self.start.get(n, p.detach())  # no update yet: no path either
            s = (self.delta[n] / ((p.detach() - start).pow(2) + 1e-20)).clamp(min=0)
            out[n] = s + self.score_before[n] if n in self.score_before else s
        return out

    def carry_state(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score()}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "delta": dict(self.delta), "start": dict(self.start),
                "previous": dict(self.previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for key in ("delta", "start", "previous"):
            setattr(self, key, cloned(state[key]))

    def carry_over(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.score_before = {n: s.clone() for n, s in state["score"].items()}
        self.importance = {n: self.prepared(s) for n, s in state["score"].items()}


class RW(ParameterRegularizer):
    name = "rw"

    def __init__(self, model: nn.Module, teacher: nn.Module | None, options: Any) -> None:
        super().__init__(model, teacher, options)
        self.fisher = {n: torch.ones_like(p) for n, p in self.params()}
        self.walk = {n: torch.zeros_like(p) for n, p in self.params()}  # this step's summed scores
        self.previous: dict[str, torch.Tensor] = {}
        self.score_before: dict[str, torch.Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def update(self) -> None:
        if self.count % self.iterations == 0:
            for n, p, g in self.grads():
                if n in self.previous:
                    moved = self.previous[n] - p
                    self.walk[n] += g * moved / (0.5 * self.fisher[n] * moved.pow(2) + EPS)
                self.previous[n] = p.detach().clone()
        self.count += 1
        update_fisher(self.fisher, self.grads(), self.alpha)

    @torch.no_grad()
    def score(self) -> dict[str, torch.Tensor]:
        out = {}
        for n, w in self.walk.items():
            s = w.clamp(min=0)
            out[n] = 0.5 * (s + self.score_before[n]) if n in self.score_before else s
        return out

    def carry_state(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score(), "fisher": dict(self.fisher)}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fisher": dict(self.fisher), "walk": dict(self.walk),
                "previous": dict(self.previous), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for key in ("fisher", "walk", "previous"):
            setattr(self, key, cloned(state[key]))
        self.count = int(state["count"])

    def carry_over(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self.score_before = {n: s.clone() for n, s in state["score"].items()}
        self.importance = {n: self.prepared(state["fisher"][n]) + self.prepared(s)
                           for n, s in state["score"].items()}
        self.fisher.update({n: f.clone() for n, f in state["fisher"].items()})


REGULARIZERS: dict[str, type[ParameterRegularizer]] = {"ewc": EWC, "pi": PI, "rw": RW}

