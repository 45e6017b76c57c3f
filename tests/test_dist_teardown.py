"""A finished rank leaves no process-group thread behind: gloo worker threads alive at interpreter teardown are the
likely cause of a rank that aborted after finishing its step in CI (exit -6, "terminate called without an active
exception")."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline import REPO

RANK_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
import torch
from segmentation.step.build import wrap_ddp
from segmentation.utils import dist

def thread_names():
    return sorted(open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task"))

env, device = dist.init_distributed("cpu")
model = wrap_ddp(torch.nn.Linear(4, 2), device)  # as a step does: DDP, a backward, a final barrier
model(torch.randn(3, 4)).sum().backward()
dist.barrier()
del model
dist.cleanup()
# One file per rank: the ranks share torchrun's stdout, where their lines can interleave.
with open(f"rank{{env.rank}}.txt", "w") as out:
    out.write(" ".join(thread_names()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from Linux's /proc")
def test_cleanup_joins_every_process_group_thread(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(repo=str(REPO)))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    threads = {rank: (tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)}
    assert all(names and not any("gloo" in name for name in names) for names in threads.values()), threads
