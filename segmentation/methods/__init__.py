"""Method registry: --method NAME (case-insensitive) -> class. Adding a method is one file and one line here."""
from __future__ import annotations

from segmentation.methods.base import Method, StepInfo
from segmentation.methods.cil import CIL
from segmentation.methods.ft import FineTuning
from segmentation.methods.ilt import ILT
from segmentation.methods.lwf import LwF, LwFMC
from segmentation.methods.mib import MiB
from segmentation.methods.options import resolve_options
from segmentation.methods.plop import PLOP
from segmentation.methods.regularized import EWC, PI, RW
from segmentation.methods.wilson import WILSON

METHODS: dict[str, type[Method]] = {
    "ft": FineTuning, "lwf": LwF, "lwf-mc": LwFMC, "ilt": ILT, "ewc": EWC, "pi": PI, "rw": RW, "mib": MiB,
    "wilson": WILSON, "cil": CIL,
    "plop": PLOP,
}

__all__ = ["METHODS", "Method", "StepInfo", "build_method", "method_class"]


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
