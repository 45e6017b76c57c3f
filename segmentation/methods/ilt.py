"""ILT (Michieli & Zanuttigh, ICCVW 2019): distillation of the outputs and of the encoder's features.

A preset of the MiB family (distillation.py), with MiB's values: CE + 100 * KD (--loss_kd 100) + 100 * MSE between
the new and the old body output (--loss_de 100; the 2048-channel ResNet output at OS16).
"""
from __future__ import annotations

from segmentation.methods.distillation import Distillation


class ILT(Distillation):
    name = "ilt"
    flag_defaults = {"loss_kd": 100.0, "loss_de": 100.0}
