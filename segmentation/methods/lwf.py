"""LwF (Li & Hoiem, ECCV 2016) and LwF-MC (its multi-class form from iCaRL, Rebuffi et al., CVPR 2017).

Presets of the MiB family (distillation.py), with MiB's values:
  LwF:    CE on the step's labels + 100 * KD of the old model's softmax on the old channels (--loss_kd 100);
  LwF-MC: BCE over all classes + 10 * C_old * BCE(old channels, sigmoid(old logits)) (--icarl
          --icarl_importance 10); its step 0 trains with BCE too, as in MiB's code.
"""
from __future__ import annotations

from segmentation.methods.distillation import Distillation


class LwF(Distillation):
    name = "lwf"
    flag_defaults = {"loss_kd": 100.0}


class LwFMC(Distillation):
    name = "lwf-mc"
    flag_defaults = {"icarl": True, "icarl_importance": 10.0}
