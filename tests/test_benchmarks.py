"""The benchmark scripts still run (tiny settings; nothing here is timed: the figures come from the scripts)."""
from __future__ import annotations

import os
import subprocess
import sys

from test_pipeline import REPO


def test_train_loop_benchmark_prints_its_table(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_loop.py"), "--backbone", "resnet18",
                             "--crop", "64", "--batch_size", "2", "--iters", "2", "--warmup", "1", "--images", "16",
                             "--device", "cpu", "--workers", "1", "--no-amp", "--eval_images", "4"],
                            cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "img/s" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["bare step (ceiling)", "FT step 0 (our loop)",
                                                      "MiB step 1 (our loop, teacher)",
                                                      "WILSON step 1 (weak, pseudo-labels)"]
    assert "evaluation, resize short side + centre crop 64: 4 images" in result.stdout
