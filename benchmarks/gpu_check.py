"""Everything GPU-related in one short run, one Markdown report (`make gpu-check`; README "GPU checks").

Parts, most important first, each in its own process with its own time budget (a part that overruns is killed and
reported as cut; the rest still runs) under one overall deadline:

  env           device, torch / CUDA / cuDNN versions
  install       `pip install --no-deps --no-build-isolation -e .` (nothing is downloaded); inplace-abn is built in
                the background meanwhile from the sdist in vendor/ if one travelled with the tree (`make gpu-vendor`)
  test_cuda     tests/test_cuda.py: NCCL through a 1-process torchrun (train, SIGKILL + resume, --test)
  peak          a large bf16 matmul (the GPU's measured peak) and the FLOPs of one training image (FlopCounterMode)
  train_step    bare steps of DeepLabV3 OS16: bf16 then fp32, channels-last on and off, each norm implementation
  train_loop    our real loop (loader, FT's loss, update) beside the bare step: img/s, data wait, peak memory
  MiB, WILSON   MiB step 1 (teacher, UNCE + UNKD) and WILSON's weak step (localizer, PAMR) beside FT, same batch
  eval          the VOC val protocol (resize the short side, centre crop) over 1,449 images
  (then train_step's fp32 rows, the package's rows once it is built, and)
  max_batch     the largest batch per norm implementation
A part cut by its budget still reports the rows it finished.

The report goes to $OUT/gpu_check.md when OUT is set, else to benchmarks/results/gpu_check-<time>.md, and is printed.
`--rehearsal` runs every part shrunk (ResNet-18, 64-px crops, a few iterations, CPU, no build) in under a minute: CI
runs it so that this command still works on the rare occasions a GPU is lent.

  bash benchmarks/gpu_check.sh               # on the GPU machine (make gpu-check)
  bash benchmarks/gpu_check.sh --rehearsal   # anywhere (make gpu-check-rehearsal)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
VENDOR = REPO / "vendor"
IABN_SDIST = "inplace-abn-1.1.0.tar.gz"


@dataclass(frozen=True)
class Settings:
    """What each part measures with. GPU_SETTINGS are the real figures; REHEARSAL shrinks every part."""

    device: str
    backbone: str
    crop: int
    batch: int
    iters: int
    warmup: int
    images: int  # generated 500x375 VOC JPEGs that the loop rows cycle over
    eval_images: int
    max_batch_cap: int
    matmul_size: int
    build_iabn: bool
    install_dry_run: bool
    deadline_s: float  # the whole run, every part included
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per part


GPU_SETTINGS = Settings(
    device="cuda", backbone="resnet101", crop=512, batch=8, iters=20, warmup=5, images=240, eval_images=1449,
    max_batch_cap=4096, matmul_size=8192, build_iabn=True, install_dry_run=False, deadline_s=450,
    budgets={"env": 45, "install": 60, "build": 240, "test_cuda": 150, "peak": 40, "train_step bf16": 60,
             "train_loop": 60, "MiB": 40, "WILSON": 50, "train_step fp32": 60, "train_step inplace_abn": 45,
             "max_batch": 90, "eval": 45, "test_cuda inplace_abn": 60})
REHEARSAL = dataclasses.replace(
    GPU_SETTINGS, device="cpu", backbone="resnet18", crop=64, batch=2, iters=2, warmup=1, images=12, eval_images=8,
    max_batch_cap=4, matmul_size=256, build_iabn=False, install_dry_run=True, deadline_s=900,
    # generous: the rehearsal checks that every part runs, not how fast (a busy CI machine takes 2-3x longer)
    budgets={name: 180 for name in GPU_SETTINGS.budgets})


# ---------------------------------------------------------------- parts (each runs in its own process)

def part_env(s: Settings) -> dict:
    import torch
    rows = [("python", platform.python_version()), ("torch", torch.__version__),
            ("CUDA (torch built with)", str(torch.version.cuda)),
            ("cuDNN", str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none")]
    if s.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible to torch (torch.cuda.is_available() is False)")
        props = torch.cuda.get_device_properties(0)
        rows += [("device", props.name), ("memory", f"{props.total_memory / 2**30:.1f} GiB"),
                 ("compute capability", f"{props.major}.{props.minor}"),
                 ("multiprocessors", str(props.multi_processor_count))]
    else:
        rows += [("device", f"CPU ({torch.get_num_threads()} threads; rehearsal)")]
    rows.append(("inplace_abn", "installed" if package_importable() else "not installed (yet)"))
    return {"rows": rows, "device": dict(rows)["device"]}


def part_peak(s: Settings) -> dict:
    """bf16 matmul TFLOP/s (the peak the step is compared with) and the FLOPs of one training image."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segmentation.models import build_segmenter
    device = torch.device(s.device)
    n = s.matmul_size
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 20 if s.device == "cuda" else 3
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    del a, b
    model = build_segmenter(s.backbone, 16, "bn", [21], device_type=device.type).to(device).train()
    images = torch.randn(2, 3, s.crop, s.crop, device=device)  # 2: training-mode BN after ASPP's 1x1 pooling
    with FlopCounterMode(display=False) as counter:
        logits, _ = model(images)
        logits.float().mean().backward()
    return {"matmul_tflops": tflops, "matmul_size": n, "train_flops_per_image": counter.get_total_flops() / 2}


def train_step_args(s: Settings, amp: bool, norm_act: str, norm_impl: str, channels_last: bool) -> list[str]:
    return ["--backbone", s.backbone, "--crop", str(s.crop), "--batch_size", str(s.batch), "--iters", str(s.iters),
            "--warmup", str(s.warmup), "--norm_act", norm_act, "--norm_impl", norm_impl, "--device", s.device,
            *(["--amp"] if amp else []), *(["--channels_last"] if channels_last else [])]


# (label, --norm_act, --norm_impl). One process, so iabn is the non-sync layer; `bn` is F.batch_norm + leaky ReLU.
NORMS = (("InPlace-ABN maths, ours (PyTorch)", "iabn", "pytorch"), ("plain BN (F.batch_norm)", "bn", "auto"))
PACKAGE_NORM = ("InPlace-ABN (inplace_abn package)", "iabn", "inplace_abn")


def partial(data: dict) -> None:
    """Writes a part's results so far: a part cut by its budget still reports the rows it finished (atomically:
    one killed mid-write leaves the previous rows readable)."""
    from segmentation.engine.checkpoint import atomic_json_dump
    path = os.environ.get("GPU_CHECK_PARTIAL")
    if path:
        atomic_json_dump(data, Path(path))


def step_rows(s: Settings, amp: bool, norms: tuple, done: list | None = None) -> dict:
    import torch
    import train_step
    rows = list(done or [])
    for label, norm_act, impl in norms:
        for channels_last in (True, False):
            row = train_step.measure(train_step.parse_args(train_step_args(s, amp, norm_act, impl, channels_last)))
            rows.append({**row, "layer": row["norm"], "norm": label})
            partial({"rows": rows})
            if s.device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows}


def part_train_step_bf16(s: Settings) -> dict:
    return step_rows(s, True, NORMS)


def part_train_step_fp32(s: Settings) -> dict:
    return step_rows(s, False, NORMS)


def part_train_step_inplace_abn(s: Settings) -> dict:
    import inplace_abn  # noqa: F401  (fails the part with a clear ImportError when the build did not happen)
    return step_rows(s, False, (PACKAGE_NORM,), step_rows(s, True, (PACKAGE_NORM,))["rows"])


def loop_args(s: Settings, *extra: str) -> argparse.Namespace:
    import train_loop
    return train_loop.parse_args(["--backbone", s.backbone, "--crop", str(s.crop), "--batch_size", str(s.batch),
                                  "--iters", str(s.iters), "--warmup", str(s.warmup), "--images", str(s.images),
                                  "--device", s.device, "--channels_last", *extra])


def fixture(s: Settings) -> Path:
    """The generated VOC folder the loop parts share (written by the first of them, into the run's work folder)."""
    from data_path import write_fixture
    root = Path(os.environ["GPU_CHECK_WORK"]) / "VOC"
    if not root.is_dir():
        staging = root.with_name("VOC.partial")  # a part cut while writing leaves no half folder behind
        shutil.rmtree(staging, ignore_errors=True)
        write_fixture(staging, s.images)
        ids = (staging / "splits" / "train_aug.txt").read_text().splitlines(keepends=True)
        # the val list cycles over the generated images: 1,449 evaluations without writing 1,449 files
        (staging / "splits" / "val.txt").write_text("".join(ids[i % len(ids)] for i in range(max(s.eval_images, 1))))
        staging.rename(root)
    return root


def loop_device(s: Settings):
    import torch
    return torch.device("cuda", 0) if s.device == "cuda" else torch.device("cpu")


def plain(row: dict) -> dict:
    """The JSON-friendly part of a train_loop row (it also holds the model and the data)."""
    return {"img/s": row["img/s"], "wait": row["wait"], "peak": row["peak"]}


def loop_setting(s: Settings) -> dict:
    import train_loop
    cfg = train_loop.parse_config(train_loop.run_flags(loop_args(s), Path("."), 0, "ft"))
    return {"workers": cfg.loader_workers(), "amp": "bf16" if cfg.amp_enabled(s.device) else "fp32"}


def part_train_loop(s: Settings) -> dict:
    import train_loop
    args, device = loop_args(s), loop_device(s)
    ft = train_loop.loop_row(args, fixture(s), device, 0, "ft")
    bare = train_loop.bare_step_row(args, device, ft["model"], ft["cfg"])
    return {"bare": plain(bare), "FT": plain(ft), **loop_setting(s)}


def method_part(s: Settings, label: str, method: str, *extra: str) -> dict:
    """One step-1 row; the report puts it beside train_loop's FT row (same model, batch and settings)."""
    import train_loop
    row = train_loop.loop_row(loop_args(s), fixture(s), loop_device(s), 1, method, *extra)
    return {label: plain(row), **loop_setting(s)}


def part_mib(s: Settings) -> dict:
    return method_part(s, "MiB", "mib")


def part_wilson(s: Settings) -> dict:
    # --pseudo_ep 0: from the first iteration the localizer, PAMR and the pseudo-supervised losses all run
    return method_part(s, "WILSON", "wilson", "--pseudo_ep", "0")


def part_max_batch(s: Settings) -> dict:
    import torch
    import train_loop
    args, device = loop_args(s), loop_device(s)
    torch.backends.cudnn.benchmark = False  # no autotuning for every batch size the search tries
    norms = list(NORMS)
    skipped = None if package_importable() else "inplace_abn is not installed (see the install section)"
    if skipped is None:
        norms.insert(0, PACKAGE_NORM)
    result = {"rows": [], "cap": s.max_batch_cap, "package_skipped": skipped, "amp": loop_setting(s)["amp"]}
    for label, norm_act, impl in norms:
        result["rows"].append({"norm": label, "batch": train_loop.max_batch(args, device, norm_act, impl,
                                                                           cap=s.max_batch_cap)})
        partial(result)
    return result


def part_eval(s: Settings) -> dict:
    import train_loop

    from segmentation.step.build import build_model
    from segmentation.tasks import load_task
    args, device, root = loop_args(s, "--eval_images", str(s.eval_images)), loop_device(s), fixture(s)
    cfg = train_loop.parse_config(train_loop.run_flags(args, root, 0, "ft"))
    model = build_model(cfg, load_task("voc", "15-5"), 0, None, device)
    model.to(device, memory_format=train_loop.model_memory_format(cfg))
    return {**train_loop.eval_row(args, root, device, model, cfg), "batch": s.batch, **loop_setting(s)}


PARTS: dict[str, Callable[[Settings], dict]] = {
    "env": part_env, "peak": part_peak, "train_step bf16": part_train_step_bf16, "train_loop": part_train_loop,
    "MiB": part_mib, "WILSON": part_wilson, "train_step fp32": part_train_step_fp32,
    "train_step inplace_abn": part_train_step_inplace_abn, "max_batch": part_max_batch, "eval": part_eval}


def package_importable() -> bool:
    try:
        import inplace_abn  # noqa: F401
    except ImportError:
        return False
    return True


def sync(device: Any) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the orchestrator

@dataclass
class Outcome:
    """How one part ended: `status` is ok, failed, cut (over its budget) or skipped, with the reason."""

    status: str
    seconds: float = 0.0
    reason: str = ""
    data: Any = None


class Runner:
    """Runs the parts one after the other, each within min(its budget, what is left of the deadline)."""

    def __init__(self, settings: Settings, log: Path, env: dict[str, str]) -> None:
        self.s, self.log, self.env = settings, log, env
        self.start = time.monotonic()
        self.outcomes: dict[str, Outcome] = {}
        self.build: subprocess.Popen | None = None
        self.build_started = 0.0

    def left(self) -> float:
        return self.s.deadline_s - (time.monotonic() - self.start)

    def budget(self, name: str) -> float:
        return min(self.s.budgets[name], self.left())

    def command(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Outcome:
        """Runs `cmd` in its own process group, killed with the group when its budget runs out."""
        if self.left() < 5:
            return Outcome("skipped", reason=f"not run: the run's {self.s.deadline_s:.0f} s deadline was reached")
        budget = self.budget(name)
        begin = time.monotonic()
        with self.log.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(cmd)} (budget {budget:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                return Outcome("cut", time.monotonic() - begin, f"cut after its {budget:.3g} s budget"
                               f"{' (what was left of the deadline)' if budget < self.s.budgets[name] else ''}")
        seconds = time.monotonic() - begin
        if rc != 0:
            return Outcome("failed", seconds, f"exit status {rc}: {last_error(self.log)}")
        return Outcome("ok", seconds)

    def part(self, name: str, out_dir: Path) -> None:
        result = out_dir / f"{name.replace(' ', '_')}.json"
        outcome = self.command(name, [sys.executable, str(Path(__file__).resolve()), "--part", name,
                                      "--settings", json.dumps(dataclasses.asdict(self.s)), "--json", str(result)],
                               {"GPU_CHECK_PARTIAL": str(result)})
        if result.is_file():  # complete, or what a cut or failed part finished before it stopped
            outcome.data = json.loads(result.read_text())  # whole: written by atomic_json_dump
            if outcome.status != "ok":
                outcome.reason += "; the rows below are those it finished"
        if self.building():
            outcome.reason = (outcome.reason + "; " if outcome.reason else "") + \
                "the inplace-abn build was compiling on the CPU meanwhile"
        self.outcomes[name] = outcome
        print(f"[gpu_check] {name}: {outcome.status} in {outcome.seconds:.0f} s {outcome.reason}", flush=True)

    def pytest(self, name: str, junit: Path, *select: str) -> None:
        outcome = self.command(name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                                      f"--junitxml={junit}", "tests/test_cuda.py", *select])
        if junit.is_file():
            outcome.data = junit_cases(junit)
            if outcome.status == "failed" and outcome.data:
                outcome.reason = "a test failed (below)"
        self.outcomes[name] = outcome
        print(f"[gpu_check] {name}: {outcome.status} in {outcome.seconds:.0f} s {outcome.reason}", flush=True)

    def install(self) -> None:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
        if self.s.install_dry_run:
            cmd.insert(4, "--dry-run")
        outcome = self.command("install", cmd)
        if self.s.install_dry_run and outcome.status == "ok":
            outcome.reason = "rehearsal: pip ran with --dry-run (the venv is installed already)"
        if outcome.status != "ok":
            # the parts still run from the tree: run.py and the scripts put the repository on sys.path
            outcome.reason += "; the checks run from the tree (PYTHONPATH) instead"
        self.outcomes["install"] = outcome

    def start_build(self) -> None:
        """Builds inplace-abn from vendor/ in the background; its rows run after it (or say why they could not)."""
        reason = iabn_skip_reason(self.s, self.env)
        if reason:
            self.outcomes["build"] = Outcome("skipped", reason=reason)
            return
        env = {**self.env, "IABN_VENDOR": str(VENDOR), "MAX_JOBS": "6"}
        arch = cuda_arch(self.env)
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch  # this GPU only: half the compile time of the script's two
        with self.log.with_name("gpu_check_build.log").open("w") as log:  # the child keeps its own descriptor
            self.build = subprocess.Popen(["bash", "tools/build_inplace_abn.sh", sys.executable], cwd=REPO, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.build_started = time.monotonic()

    def building(self) -> bool:
        return self.build is not None and self.build.poll() is None

    def finish_build(self) -> None:
        if self.build is None:
            return
        budget = self.s.budgets["build"] - (time.monotonic() - self.build_started)
        try:
            rc = self.build.wait(timeout=max(0.0, min(budget, self.left() - 60)))
        except subprocess.TimeoutExpired:
            kill_group(self.build)
            self.outcomes["build"] = Outcome("cut", time.monotonic() - self.build_started,
                                             f"cut after its {self.s.budgets['build']:.0f} s budget (or to leave the "
                                             "rest of the run its time); its rows are skipped")
            return
        seconds = time.monotonic() - self.build_started
        build_log = self.log.with_name("gpu_check_build.log")
        self.outcomes["build"] = (Outcome("ok", seconds, "built from vendor/" + IABN_SDIST) if rc == 0 else
                                  Outcome("failed", seconds, f"exit status {rc}: {last_error(build_log)}"))

    def package_missing(self) -> str | None:
        """Why the package's rows cannot run, or None when inplace_abn imports (built now or installed before)."""
        if importable(self.env):
            return None
        build = self.outcomes.get("build")
        return f"inplace_abn is not installed ({build.reason if build else 'no build'})"


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def last_error(log: Path, lines: int = 3) -> str:
    text = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " / ".join(text[-lines:])[-400:] if text else "no output"


def junit_cases(junit: Path) -> list[dict]:
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                reason = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "reason": reason})
    return cases


def importable(env: dict[str, str]) -> bool:
    return subprocess.run([sys.executable, "-c", "import inplace_abn"], env=env, capture_output=True).returncode == 0


def iabn_skip_reason(s: Settings, env: dict[str, str]) -> str | None:
    if importable(env):
        return "inplace_abn is installed already: nothing to build"
    if not s.build_iabn:
        return "rehearsal: no inplace-abn build"
    if not (VENDOR / IABN_SDIST).is_file():
        return (f"vendor/{IABN_SDIST} did not travel with the tree (`make gpu-vendor` here, then carry vendor/); "
                "the package's rows are skipped")
    return None


def cuda_arch(env: dict[str, str]) -> str | None:
    probe = "import torch; p = torch.cuda.get_device_capability(0); print(f'{p[0]}.{p[1]}')"
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


# ---------------------------------------------------------------- the report

def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def status_line(o: Outcome | None) -> str:
    if o is None:
        return "*not run: an earlier part decided it (see above)*"
    text = {"ok": f"done in {o.seconds:.0f} s", "failed": f"**failed** after {o.seconds:.0f} s",
            "cut": f"**cut** after {o.seconds:.0f} s", "skipped": "**skipped**"}[o.status]
    return f"*{text}{': ' + o.reason if o.reason else ''}*"


def report(runner: Runner, settings: Settings, rehearsal: bool) -> str:
    o = runner.outcomes
    env = o.get("env")
    env_rows = env.data["rows"] if env and env.data else []
    device = env.data["device"] if env and env.data else "unknown device"
    lines = [f"# GPU check: {device}", "",
             f"{'Rehearsal (every part shrunk, CPU)' if rehearsal else 'Full run'}: DeepLabV3-{settings.backbone} "
             f"OS16, {settings.crop}x{settings.crop}, batch {settings.batch}, {settings.iters} timed iterations after "
             f"{settings.warmup}; {time.strftime('%Y-%m-%d %H:%M %Z')}; the whole run took "
             f"{time.monotonic() - runner.start:.0f} s (deadline {settings.deadline_s:.0f} s).", ""]
    lines += ["## env", "", status_line(env), "", *table(["what", "value"], [list(r) for r in env_rows]), ""]
    lines += ["## install", "", "pip: " + status_line(o.get("install")), "",
              "inplace-abn build: " + status_line(o.get("build")), ""]
    lines += section_tests(o)
    lines += section_peak(o)
    lines += section_train_step(o)
    lines += section_train_loop(o)
    for name in ("MiB", "WILSON"):
        lines += section_method(o, name)
    lines += section_max_batch(o)
    lines += section_eval(o)
    return "\n".join(lines) + "\n"


def section_tests(o: dict[str, Outcome]) -> list[str]:
    rows = []
    for name in ("test_cuda", "test_cuda inplace_abn"):
        cases = o[name].data if name in o and o[name].data else []
        rows += [[c["test"], c["outcome"], f"{c['seconds']:.0f}", c["reason"]] for c in cases]
    lines = ["## test_cuda", "", "tests/test_cuda.py: " + status_line(o.get("test_cuda")), "",
             "after the inplace-abn build, its parametrisation again: " + status_line(o.get("test_cuda inplace_abn")),
             ""]
    return lines + (table(["test", "outcome", "s", "reason"], rows) if rows else ["no test result"]) + [""]


def best_bf16_step(o: dict[str, Outcome]) -> dict | None:
    rows = [r for name in ("train_step bf16", "train_step inplace_abn") if name in o and o[name].data
            for r in o[name].data["rows"] if r["amp"].startswith("bf16")]
    return max(rows, key=lambda r: r["img/s"]) if rows else None


def section_peak(o: dict[str, Outcome]) -> list[str]:
    lines = ["## peak", "", status_line(o.get("peak")), ""]
    peak = o.get("peak")
    if not (peak and peak.data):
        return lines
    d = peak.data
    lines += [f"bf16 matmul {d['matmul_size']}x{d['matmul_size']}x{d['matmul_size']}: **{d['matmul_tflops']:.1f} "
              f"TFLOP/s** (the peak below). One training image, forward + backward (FlopCounterMode): "
              f"{d['train_flops_per_image'] / 1e12:.3f} TFLOP.", ""]
    best = best_bf16_step(o)
    if best:
        achieved = best["img/s"] * d["train_flops_per_image"] / 1e12
        lines += [f"Compute-limit ratio, the best bf16 bare step ({best['norm']}, "
                  f"{'channels-last' if best['channels_last'] else 'NCHW'}): {best['img/s']:.1f} img/s x "
                  f"{d['train_flops_per_image'] / 1e12:.3f} TFLOP = {achieved:.1f} TFLOP/s, "
                  f"**{100 * achieved / d['matmul_tflops']:.0f} %** of the measured peak (target: 40 % or more).", ""]
    else:
        lines += ["Compute-limit ratio: no bf16 train_step row to compute it from.", ""]
    return lines


def section_train_step(o: dict[str, Outcome]) -> list[str]:
    lines = ["## train_step", ""]
    rows = []
    for name in ("train_step bf16", "train_step fp32", "train_step inplace_abn"):
        lines.append(f"{name}: {status_line(o.get(name))}")
        if name in o and o[name].data:
            rows += [[r["norm"], r["amp"], "channels-last" if r["channels_last"] else "NCHW", r["batch"],
                      f"{r['img/s']:.2f}", f"{r['ms/iter']:.0f}", r["peak"]] for r in o[name].data["rows"]]
    return lines + [""] + table(["norm", "amp", "layout", "batch", "img/s", "ms/iter", "peak memory"], rows) + [""]


def loop_table(data: dict, labels: list[tuple[str, str]], ceiling: float) -> list[str]:
    rows = [[label, f"{data[key]['img/s']:.2f}", f"{100 * data[key]['img/s'] / ceiling:.0f} %",
             f"{100 * data[key]['wait']:.1f} %", data[key]["peak"]] for key, label in labels if key in data]
    return table(["row", "img/s", "share", "waiting for data", "peak memory"], rows)


def section_train_loop(o: dict[str, Outcome]) -> list[str]:
    part = o.get("train_loop")
    lines = ["## train_loop", "", status_line(part), ""]
    if part and part.data:
        d = part.data
        lines += [f"{d['amp']}, channels-last, our ABN (--norm_act iabn_sync, one process), {d['workers']} loader "
                  "workers; share = of the bare step (target: the loop at 90 % or more).", "",
                  *loop_table(d, [("bare", "bare step (ceiling)"), ("FT", "FT step 0 (our loop)")], d["bare"]["img/s"]),
                  ""]
    return lines


def section_method(o: dict[str, Outcome], name: str) -> list[str]:
    part = o.get(name)
    lines = [f"## {name}", "", status_line(part), ""]
    loop = o.get("train_loop")
    if part and part.data:
        label = {"MiB": "MiB step 1 (teacher, UNCE + UNKD)", "WILSON": "WILSON weak step (localizer, PAMR)"}[name]
        data = {**part.data, **({"FT": loop.data["FT"]} if loop and loop.data else {})}
        ceiling = data["FT"]["img/s"] if "FT" in data else data[name]["img/s"]
        lines += [f"Beside train_loop's FT step 0: same model, batch and settings ({part.data['amp']}); share = of "
                  f"{'FT' if 'FT' in data else 'itself (no FT row: train_loop did not finish)'}'s img/s.", "",
                  *loop_table(data, [("FT", "FT step 0"), (name, label)], ceiling), ""]
    return lines


def section_max_batch(o: dict[str, Outcome]) -> list[str]:
    part = o.get("max_batch")
    lines = ["## max_batch", "", status_line(part), ""]
    if part and part.data:
        d = part.data
        rows = [[r["norm"], f"{r['batch']}{' (the search stops at ' + str(d['cap']) + ')' if r['batch'] >= d['cap'] else ''}"]
                for r in d["rows"]]
        if d["package_skipped"]:
            rows.append([PACKAGE_NORM[0], "skipped: " + d["package_skipped"]])
        lines += [f"Largest batch for one {d['amp']} forward + backward (target: InPlace-ABN at 1.5x plain BN's or "
                  "more).", "", *table(["norm", "largest batch"], rows), ""]
    return lines


def section_eval(o: dict[str, Outcome]) -> list[str]:
    part = o.get("eval")
    lines = ["## eval", "", status_line(part), ""]
    if part and part.data:
        d = part.data
        lines += [f"VOC val protocol (short side to the crop, centre crop), {d['images']} images at batch "
                  f"{d['batch']}, {d['amp']}, {d['workers']} loader workers: **{d['seconds']:.1f} s** "
                  f"({d['img/s']:.1f} img/s; target: well under a minute for 1,449).", ""]
    return lines


# ---------------------------------------------------------------- entry points

def run_all(settings: Settings, rehearsal: bool, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    with tempfile.TemporaryDirectory() as parts_dir:
        work = Path(parts_dir)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GPU_CHECK_WORK": str(work),
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
        runner = Runner(settings, log, env)
        runner.part("env", work)
        runner.install()
        runner.start_build()
        runner.pytest("test_cuda", work / "test_cuda.xml")
        for name in ("peak", "train_step bf16", "train_loop", "MiB", "WILSON", "eval", "train_step fp32"):
            runner.part(name, work)
        runner.finish_build()
        missing = runner.package_missing()
        if missing:
            for name in ("train_step inplace_abn", "test_cuda inplace_abn"):
                runner.outcomes[name] = Outcome("skipped", reason=missing)
            runner.part("max_batch", work)
        else:
            runner.part("train_step inplace_abn", work)
            runner.part("max_batch", work)
            if runner.outcomes["build"].status == "ok":  # built in this run: test_cuda skipped its parametrisation
                runner.pytest("test_cuda inplace_abn", work / "test_cuda_iabn.xml", "-k", "inplace_abn")
            else:
                runner.outcomes["test_cuda inplace_abn"] = Outcome(
                    "skipped", reason="not needed: the package was installed before test_cuda ran")
    text = report(runner, settings, rehearsal)
    path = out / "gpu_check.md" if os.environ.get("OUT") else out / f"gpu_check-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text(text)
    print(text)
    print(f"[gpu_check] report: {path}; every part's output: {log}")
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rehearsal", action="store_true", help="every part shrunk, on the CPU, no build (CI)")
    p.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                   help="override one part's time budget (e.g. --budget test_cuda=300); repeatable")
    p.add_argument("--deadline", type=float, default=None, help="seconds for the whole run (default 450; 900 rehearsal)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else benchmarks/results)")
    p.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def with_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    budgets = dict(settings.budgets)
    for item in args.budget:
        name, sep, seconds = item.rpartition("=")
        if not sep or name not in budgets:
            raise SystemExit(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(budgets)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise SystemExit(f"--budget {item!r}: {seconds!r} is not a number of seconds") from None
    return dataclasses.replace(settings, budgets=budgets,
                               deadline_s=args.deadline if args.deadline is not None else settings.deadline_s)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.part:  # one part, in the process the orchestrator started for it
        sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]
        settings = Settings(**json.loads(args.settings))
        if settings.device == "cuda":
            import torch
            torch.cuda.set_device(0)
            torch.backends.cudnn.benchmark = True  # as run.py on GPUs
        from segmentation.engine.checkpoint import atomic_json_dump
        atomic_json_dump(PARTS[args.part](settings), args.json)
        return
    settings = with_overrides(REHEARSAL if args.rehearsal else GPU_SETTINGS, args)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks" / "results")
    run_all(settings, args.rehearsal, out)


if __name__ == "__main__":
    main()
