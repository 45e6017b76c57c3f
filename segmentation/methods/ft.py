"""Fine-tuning: cross-entropy on the current step's labels, nothing against forgetting (the lower bound).

The MiB family (distillation.py) with every term off; its flags still mix in (`--method FT --loss_kd 100` is LwF).
"""
from __future__ import annotations

from segmentation.methods.distillation import Distillation


class FineTuning(Distillation):
    name = "ft"
