"""Train (or test) one step of a class-incremental segmentation protocol.

    torchrun --standalone --nproc_per_node=2 run.py --dataset voc --task 15-5 --step 1 --method MiB --overlap

Reads top to bottom: parse flags -> join the process group -> data -> model (+ teacher) -> method -> train ->
test on every class seen so far -> write the step artifact and its metrics. Step t starts from step t-1's artifact.
"""
from __future__ import annotations

import sys

from segmentation.cli import main

if __name__ == "__main__":
    sys.exit(main())
