"""`make gpu-check`'s CPU rehearsal: every part runs shrunk and the report has every section with numbers or a reason.

The GPU machine is lent rarely; this keeps the one command that uses it from rotting in between (README "GPU checks").
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test_pipeline import REPO

NUMBER = re.compile(r"\|\s*\d+(\.\d+)?\s*(%|GiB|\(|\|)")


def sections(report: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", report, flags=re.M)
    return {name.strip(): body for name, body in zip(parts[1::2], parts[2::2])}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    # env gets half a second: it is cut, and the parts after it must still run (a hanging part costs only its budget)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--rehearsal", "--budget", "env=0.5"],
                            env=os.environ | {"OUT": str(out), "GPU_CHECK_PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "gpu_check.md").read_text()
    assert report in result.stdout  # printed as well as written
    return report


def test_every_section_has_numbers_or_a_reason(rehearsal):
    found = sections(rehearsal)
    for name in ("test_cuda", "peak", "train_step", "train_loop", "MiB", "WILSON", "max_batch", "eval"):
        assert name in found, f"section {name} missing:\n{rehearsal}"
    # the tests cannot run without CUDA: each says so
    assert re.search(r"test_nccl_step_resumes_after_sigkill \| skipped \| \d+ \| needs a CUDA GPU", found["test_cuda"])
    for name in ("train_step", "train_loop", "MiB", "WILSON", "max_batch"):
        assert NUMBER.search(found[name]), f"section {name} has no figure:\n{found[name]}"
    assert re.search(r"\*\*\d+ %\*\* of the measured peak", found["peak"]), found["peak"]
    assert re.search(r"bf16 matmul 256x256x256: \*\*[\d.]+ TFLOP/s\*\*", found["peak"])
    assert re.search(r"8 images at batch 2, .*\*\*[\d.]+ s\*\*", found["eval"]), found["eval"]
    layouts = re.findall(r"\| (bf16|off \(fp32\)) \| (channels-last|NCHW) \|", found["train_step"])
    assert {("bf16", "channels-last"), ("bf16", "NCHW"), ("off (fp32)", "channels-last"),
            ("off (fp32)", "NCHW")} <= set(layouts)
    assert "| MiB step 1 (teacher, UNCE + UNKD) |" in found["MiB"] and "| FT step 0 |" in found["MiB"]
    assert "| WILSON weak step (localizer, PAMR) |" in found["WILSON"]


def test_a_part_over_its_budget_is_cut_and_reported(rehearsal):
    env = sections(rehearsal)["env"]
    assert "**cut** after" in env and "cut after its 0.5 s budget" in env
    assert "deadline was reached" not in rehearsal  # everything after it ran


def test_budget_flag_names_the_parts():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--budget", "nope=3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--budget 'nope=3'" in result.stderr and "test_cuda" in result.stderr
