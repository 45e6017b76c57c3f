"""Method registry: --method NAME (case-insensitive) -> class. Adding a method is one file and one line here."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

from segmentation.methods.base import Method, StepInfo
from segmentation.methods.cil import CIL
from segmentation.methods.dkd import DKD
from segmentation.methods.ft import FineTuning
from segmentation.methods.ilt import ILT
from segmentation.methods.lwf import LwF, LwFMC
from segmentation.methods.memory_variants import DKDM, STARM
from segmentation.methods.mib import MiB
from segmentation.methods.options import resolve_options
from segmentation.methods.plop import PLOP
from segmentation.methods.regularized import EWC, PI, RW
from segmentation.methods.star import STAR
from segmentation.methods.wilson import WILSON

METHODS: dict[str, type[Method]] = {
    "ft": FineTuning, "lwf": LwF, "lwf-mc": LwFMC, "ilt": ILT, "ewc": EWC, "pi": PI, "rw": RW, "mib": MiB,
    "wilson": WILSON, "cil": CIL,
    "plop": PLOP,
    "star": STAR,
    "dkd": DKD,
    "dkd-m": DKDM, "star-m": STARM,
}

__all__ = ["METHODS", "Method", "Predict", "StepInfo", "build_method", "method_class", "predictor", "saved_predictor"]

Predict = Callable[[torch.Tensor], torch.Tensor]  # scores N x C x H x W -> learning-order indices N x H x W


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"--method {name!r} is unknown; valid methods: {', '.join(sorted(METHODS))}") from None


def build_method(name: str, info: StepInfo, model, teacher, options=None) -> Method:
    """`options`: the method's Options instance, or a dict of some of its fields (the others from the method's
    preset, then the fields' defaults, as on the command line)."""
    cls = method_class(name)
    if options is None or isinstance(options, dict):
        given = dict(options or {})
        flags = {"task": getattr(info.task, "name", ""), "step": info.step, **given}
        options = resolve_options(cls.Options, [given, cls.flag_defaults], flags)
    return cls(info, model, teacher, options)


def predictor(name: str, options: Any) -> Predict:
    """The prediction rule of method `name` under `options` (Method.predict)."""
    return functools.partial(method_class(name).predict, options=options)


def saved_predictor(saved: dict[str, Any]) -> Predict:
    """The rule of the method an artifact was trained with, from its saved config (--test, --infer: the command
    line's --method does not change how a trained model predicts). Options the method no longer has are dropped,
    missing ones take their defaults, and options an older version saved in a form the method now refuses give way
    to the defaults."""
    cls = method_class(saved.get("method", "ft"))
    known = {f.name for f in dataclasses.fields(cls.Options)}
    try:
        options = cls.Options(**{k: v for k, v in (saved.get("method_options") or {}).items() if k in known})
    except (TypeError, ValueError):
        options = cls.Options()
    return functools.partial(cls.predict, options=options)
