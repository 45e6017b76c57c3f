"""EWC, PI and RW as methods: presets of the MiB family (distillation.py) with a parameter regularizer.

The statistics and the penalty are in regularizers.py. Weights as MiB's presets (PLOP's scripts use 100 for all
three). Every step of the protocol must run with the same --regularizer, step 0 included: the importances are
gathered while a step trains and penalise the next one.
"""
from __future__ import annotations

from segmentation.methods.distillation import Distillation


class EWC(Distillation):
    name = "ewc"
    flag_defaults = {"regularizer": "ewc", "reg_importance": 500.0}


class PI(Distillation):
    name = "pi"
    flag_defaults = {"regularizer": "pi", "reg_importance": 500.0}


class RW(Distillation):
    name = "rw"
    flag_defaults = {"regularizer": "rw", "reg_importance": 100.0}
