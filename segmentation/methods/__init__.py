"""Method registry: --method NAME (case-insensitive) -> class. Adding a method is one file and one line here."""
from __future__ import annotations

from segmentation.methods.base import Method, StepInfo
from segmentation.methods.cil import CIL
from segmentation.methods.ft import FineTuning
from segmentation.methods.mib import MiB
from segmentation.methods.wilson import WILSON

METHODS: dict[str, type[Method]] = {"ft": FineTuning, "mib": MiB, "wilson": WILSON, "cil": CIL}

__all__ = ["METHODS", "Method", "StepInfo", "build_method"]


def build_method(name: str, info: StepInfo, model, teacher, options: dict) -> Method:
    try:
        cls = METHODS[name.lower()]
    except KeyError:
        raise ValueError(f"--method {name!r} is unknown; valid methods: {', '.join(sorted(METHODS))}") from None
    return cls(info, model, teacher, options)
