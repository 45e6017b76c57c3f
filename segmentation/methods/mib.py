"""MiB (Cermelli et al., CVPR 2020): unbiased CE, unbiased KD and a balanced init of the new classifier.

A preset of the MiB family (distillation.py): --unce --unkd --init_balanced --loss_kd 10 (100 on the 15-1 tasks).
"""
from __future__ import annotations

from typing import Any

from segmentation.methods.distillation import Distillation


def default_kd_weight(flags: dict[str, Any]) -> float:
    """MiB's authors used 100 for the 15-1 protocols (MiB issue #22, hard-coded in MiBv2) and 10 elsewhere."""
    return 100.0 if str(flags["task"]).startswith(("15-1", "15-5s")) else 10.0


default_kd_weight.preset_text = "10, 100 on 15-1"  # type: ignore[attr-defined]


class MiB(Distillation):
    name = "mib"
    flag_defaults = {"unce": True, "unkd": True, "init_balanced": True, "loss_kd": default_kd_weight}
