"""DKD-M and STAR-M: DKD and STAR with the class-balanced exemplar memory of exemplars.py.

Each trains exactly like its method and, at steps t > 0, also on the memory chosen at the end of step t-1. Step 0
computes what the parent's computes, but its artifact must carry the memory chosen at its end, so the -M variant
trains its own step 0 (its own step0_key: a benchmark never hands it the parent's, which carries no memory). Memory sizes (--mem_size, images over
all classes): DKD-M 100 on VOC and 300 on ADE (DKD's configs); STAR-M 50 on VOC (STAR's script comment). STAR has
no ADE STAR-M: we use DKD-M's 300 there. Other datasets (the built-in shapes) take VOC's values.
"""
from __future__ import annotations

from dataclasses import dataclass

from segmentation.methods.dkd import DKD, DKDOptions
from segmentation.methods.exemplars import ExemplarMemory, MemoryOptions, memory_size_preset
from segmentation.methods.star import STAR, STAROptions


@dataclass(frozen=True)
class DKDMOptions(MemoryOptions, DKDOptions):
    """DKD-M"""


@dataclass(frozen=True)
class STARMOptions(MemoryOptions, STAROptions):
    """STAR-M"""


class DKDM(ExemplarMemory, DKD):
    name = "dkd-m"
    Options = DKDMOptions
    flag_defaults = {**DKD.flag_defaults, "mem_size": memory_size_preset(voc=100, ade=300)}

    @classmethod
    def step0_key(cls, options: DKDMOptions) -> tuple:
        return (*DKD.step0_key(options), "mem_size", options.mem_size)


class STARM(ExemplarMemory, STAR):
    name = "star-m"
    Options = STARMOptions
    flag_defaults = {**STAR.flag_defaults, "mem_size": memory_size_preset(voc=50, ade=300)}

    @classmethod
    def step0_key(cls, options: STARMOptions) -> tuple:
        return (*STAR.step0_key(options), "mem_size", options.mem_size)
