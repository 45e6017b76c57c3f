"""The MiB family's baselines (LwF, LwF-MC, ILT, EWC, PI, RW) against direct implementations of their formulas
(MiB's utils/loss.py and utils/regularizer.py), their flags, and the regularizers' statistics across a step boundary and
across ranks."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from segmentation.config import ConfigError, parse_config
from segmentation.methods import StepInfo, build_method
from segmentation.methods.regularizers import EWC, PI, RW, normalized


class Tiny(nn.Module):
    """Body + one classifier per step, returning what Segmenter returns (logits, {"body": ...})."""

    def __init__(self, classes_per_step: list[int]) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 5, 1)
        self.cls = nn.ModuleList([nn.Conv2d(5, c, 1) for c in classes_per_step])

    def forward(self, x, features=None):
        body = self.body(x)
        return torch.cat([c(body) for c in self.cls], 1), {"body": body}


class StubTask:
    name = "4-2"


def step1(method: str, options: dict | None = None, seed: int = 0):
    torch.manual_seed(seed)
    teacher, student = Tiny([4]), Tiny([4, 2])
    student.load_state_dict(teacher.state_dict(), strict=False)
    info = StepInfo(task=StubTask(), step=1, num_old=4, num_classes=6, epochs=1)
    return build_method(method, info, student, teacher, options or {}), student, teacher


def labels_for(layout: str, seed: int) -> torch.Tensor:
    """disjoint: background, new classes and void only; overlap: old class ids may appear too (they read as
    background in the new data, and the losses must treat them so)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 6, (2, 3, 4), generator=g)
    if layout == "disjoint":
        labels = torch.where(labels < 4, torch.zeros_like(labels), labels)
    labels[0, 0, :2] = 255
    return labels


def pixels(t: torch.Tensor):
    n, _, h, w = t.shape
    return [(i, y, x) for i in range(n) for y in range(h) for x in range(w)]


@pytest.mark.parametrize("layout", ["disjoint", "overlap"])
def test_lwf_is_ce_plus_100_times_the_mean_over_old_channels_kd(layout):
    method, student, teacher = step1("lwf")
    x, labels = torch.randn(2, 3, 3, 4), labels_for(layout, 1)
    out, old = student(x), teacher(x)
    terms = method.losses({"label": labels}, out, old, 0)
    assert set(terms) == {"ce", "kd"} and method.needs_teacher
    logits, t = out[0].double(), old[0].double()
    kd = ce = 0.0
    valid = 0
    for i, y, xx in pixels(logits):
        q = torch.softmax(t[i, :, y, xx], 0)
        log_p = torch.log_softmax(logits[i, :4, y, xx], 0)
        kd += -(q * log_p).sum().item() / 4
        if labels[i, y, xx] != 255:
            ce += -torch.log_softmax(logits[i, :, y, xx], 0)[labels[i, y, xx]].item()
            valid += 1
    assert terms["kd"].item() == pytest.approx(100 * kd / 24, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce / valid, rel=1e-5)


@pytest.mark.parametrize("layout", ["disjoint", "overlap"])
def test_lwf_mc_is_bce_plus_icarl_distillation(layout):
    method, student, teacher = step1("lwf-mc")
    x, labels = torch.randn(2, 3, 3, 4), labels_for(layout, 2)
    out, old = student(x), teacher(x)
    terms = method.losses({"label": labels}, out, old, 0)
    assert set(terms) == {"bce", "icarl"}
    logits, t = out[0].double(), old[0].double()

    def bce(z, target):
        return -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z))

    seg = icarl = 0.0
    valid = 0
    for i, y, xx in pixels(logits):
        z = logits[i, :, y, xx]
        icarl += bce(z[:4], torch.sigmoid(t[i, :, y, xx])).sum().item()
        if labels[i, y, xx] != 255:
            seg += bce(z, F.one_hot(labels[i, y, xx], 6).double()).sum().item()
            valid += 1
    assert terms["bce"].item() == pytest.approx(seg / valid, rel=1e-5)
    # MiB: icarl_importance * C_old * BCEWithLogits(mean over pixels and old channels), importance 10
    assert terms["icarl"].item() == pytest.approx(10 * 4 * icarl / (24 * 4), rel=1e-5)


def test_ilt_adds_feature_distillation_of_the_body():
    method, student, teacher = step1("ilt")
    with torch.no_grad():
        student.body.weight.add_(0.1)
    x, labels = torch.randn(2, 3, 3, 4), labels_for("disjoint", 3)
    out, old = student(x), teacher(x)
    terms = method.losses({"label": labels}, out, old, 0)
    assert set(terms) == {"ce", "kd", "de"} and method.teacher_features == {"body"}
    expected = ((out[1]["body"] - old[1]["body"]) ** 2).mean()
    torch.testing.assert_close(terms["de"], 100 * expected)


def test_freeze_trains_the_head_only_at_later_steps():
    method, student, _ = step1("ilt", {"freeze": True})
    assert not any(p.requires_grad for p in student.body.parameters())
    assert all(p.requires_grad for p in student.cls.parameters())
    assert all(p["params"] and all(q.requires_grad for q in p["params"]) for p in method.param_groups(0.01))


def test_presets_and_mixing_flags_as_in_mibs_scripts():
    lwf = parse_config(["--method", "LwF"]).method_options
    ilt = parse_config(["--method", "ILT"]).method_options
    mc = parse_config(["--method", "LwF-MC"]).method_options
    assert (lwf.loss_kd, ilt.loss_kd, ilt.loss_de, mc.icarl, mc.icarl_importance) == (100, 100, 100, True, 10)
    ewc, pi, rw = (parse_config(["--method", m]).method_options for m in ("EWC", "PI", "RW"))
    assert [(o.regularizer, o.reg_importance) for o in (ewc, pi, rw)] == [("ewc", 500), ("pi", 500), ("rw", 100)]
    ft_as_lwf = parse_config(["--method", "FT", "--loss_kd", "100"]).method_options
    assert ft_as_lwf == lwf  # MiB's scripts: --method FT plus the individual flags
    mib_ewc = parse_config(["--method", "MiB", "--regularizer", "ewc", "--no-unkd"]).method_options
    assert (mib_ewc.unce, mib_ewc.unkd, mib_ewc.regularizer) == (True, False, "ewc")
    assert parse_config(["--method", "FT"]).method_options.loss_kd == 0.0


@pytest.mark.parametrize("argv, named", [
    (["--method", "CIL", "--unce"], "--unce"),
    (["--method", "WILSON", "--loss_kd", "10"], "--loss_kd"),
    (["--method", "MiB", "--lambda_GS", "2"], "--lambda_GS"),
    (["--method", "FT", "--pseudo_ep", "1"], "--pseudo_ep"),
])
def test_a_flag_the_method_does_not_read_is_refused(argv, named):
    with pytest.raises(ConfigError, match=named) as info:
        parse_config(argv)
    assert "does not read" in str(info.value)


def test_help_groups_the_flags_by_method(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    text = text[text.index("options:"):]  # the groups, not the usage line
    family, wilson, cil = (text.index(f"method: {t}") for t in ("MiB family", "WILSON", "CIL"))
    flag = lambda name: text.index(f"\n  --{name} ")  # noqa: E731  (where the flag itself is listed)
    assert family < flag("reg_importance") < wilson < flag("pseudo_ep") < cil < flag("temp")
    assert "presets: lwf 100.0, ilt 100.0" in " ".join(text.split())


# ---------------------------------------------------------------- regularizers

class Options:
    reg_alpha, reg_iterations, reg_no_normalize = 0.9, 2, False


def tiny_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    teacher, student = Tiny([4]), Tiny([4, 2])
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student, teacher


def fake_updates(model: nn.Module, regularizer, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Known gradients and parameter moves: returns, per iteration, the gradients seen by update()."""
    g = torch.Generator().manual_seed(seed)
    seen = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
        regularizer.update()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    return seen


def test_ewc_fisher_is_the_running_mean_of_squared_gradients_and_penalises_the_next_step():
    torch.manual_seed(0)
    model = Tiny([4])
    step0 = EWC(model, None, Options())
    grads = fake_updates(model, step0, 3, seed=1)
    for n, p in model.named_parameters():
        expected = torch.ones_like(p)
        for g in grads:
            expected = 0.9 * g[n] ** 2 + 0.1 * expected
        torch.testing.assert_close(step0.carry_state()["fisher"][n], expected)
    assert not step0.penalizes  # step 0: no old model

    student, teacher = Tiny([4, 2]), model  # step 1 starts from step 0's weights
    student.load_state_dict(teacher.state_dict(), strict=False)
    step1_reg = EWC(student, teacher, Options())
    step1_reg.carry_over(step0.carry_state())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05)
    expected = sum((normalized(step0.fisher[n]) * (p - dict(teacher.named_parameters())[n]) ** 2).sum()
                   for n, p in student.named_parameters() if n in step0.fisher)
    assert step1_reg.penalizes and step1_reg.penalty().item() == pytest.approx(expected.item(), rel=1e-5)
    for p in student.parameters():
        p.grad = torch.zeros_like(p)
    step1_reg.add_penalty_gradient(500.0)
    for n, p in student.named_parameters():
        if n.startswith("cls.1"):  # the new classifier has no old value: not penalised
            assert torch.count_nonzero(p.grad) == 0
        else:
            old = dict(teacher.named_parameters())[n]
            torch.testing.assert_close(p.grad, 2 * 500 * normalized(step0.fisher[n]) * (p - old).detach())
    # the new classifier starts its Fisher at ones; the old parameters keep theirs (EWC never resets)
    assert torch.equal(step1_reg.fisher["cls.1.weight"], torch.ones_like(student.cls[1].weight))
    torch.testing.assert_close(step1_reg.fisher["body.weight"], step0.fisher["body.weight"])


def test_pi_score_is_the_clipped_path_integral_over_the_squared_distance():
    model, _ = tiny_pair()
    reg = PI(model, None, Options())
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trail = [start]
    grads = []
    g = torch.Generator().manual_seed(4)
    for _ in range(4):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        reg.update()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
        trail.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n, p in model.named_parameters():
        # update k reads the gradient at theta_k and the move theta_{k-1} -> theta_k (MiB's order: before the step)
        delta = sum(grads[k][n] * (trail[k - 1][n] - trail[k][n]) for k in range(1, 4))
        expected = (delta / ((p.detach() - start[n]) ** 2 + 1e-20)).clamp(min=0)
        torch.testing.assert_close(reg.carry_state()["score"][n], expected)


def test_rw_walk_every_reg_iterations_plus_fisher():
    model, _ = tiny_pair()
    reg = RW(model, None, Options())  # reg_iterations 2: the walk is read at iterations 0, 2, 4
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    walk = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    snapshot: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(5)
    for it in range(5):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        if it % 2 == 0:
            first = not snapshot
            for n, p in model.named_parameters():
                if not first:
                    moved = snapshot[n] - p.detach()
                    walk[n] += p.grad * moved / (0.5 * fisher[n] * moved ** 2 + 1e-8)
                snapshot[n] = p.detach().clone()
        for n, p in model.named_parameters():
            fisher[n] = 0.9 * p.grad ** 2 + 0.1 * fisher[n]
        reg.update()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    state = reg.carry_state()
    assert state["fisher"].keys() == fisher.keys()
    for n in fisher:
        torch.testing.assert_close(state["fisher"][n], fisher[n])
        torch.testing.assert_close(state["score"][n], walk[n].clamp(min=0))
    student, teacher = Tiny([4, 2]), model
    student.load_state_dict(teacher.state_dict(), strict=False)
    nxt = RW(student, teacher, Options())
    nxt.carry_over(state)
    n = "body.weight"
    torch.testing.assert_close(nxt.importance[n], normalized(fisher[n]) + normalized(walk[n].clamp(min=0)))


def test_a_regularizer_refuses_a_previous_step_without_its_statistics():
    model, teacher = tiny_pair()
    with pytest.raises(ValueError, match="--regularizer ewc"):
        EWC(model, teacher, Options()).carry_over({})
    with pytest.raises(ValueError, match="holds pi"):
        EWC(model, teacher, Options()).carry_over({"name": "pi", "score": {}})


def step0_statistics(method: str) -> dict:
    """carry_state() of `method` at step 0 after three updates with made-up gradients (the same each call)."""
    torch.manual_seed(0)
    model = Tiny([4])
    info0 = StepInfo(task=StubTask(), step=0, num_old=0, num_classes=4, epochs=1)
    step0 = build_method(method, info0, model, None, {})
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        step0.after_backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    return step0.carry_state()


def test_one_step0_serves_every_regularizer_and_a_later_step_carries_only_its_own():
    state = step0_statistics("ewc")
    assert set(state) == {"ewc", "pi", "rw"}  # step 0 trains the same weights whichever regularizer asked
    for name in ("pi", "rw"):  # the same statistics as that regularizer's own step 0
        own = step0_statistics(name)[name]
        for key, value in own.items():
            if isinstance(value, dict):
                assert value.keys() == state[name][key].keys()
                assert all(torch.equal(value[n], state[name][key][n]) for n in value), (name, key)
        method, _, _ = step1(name)  # so PI's step 1 may start from EWC's step 0
        method.carry_over(state)
        assert method.regularizer.penalizes and set(method.carry_state()) == {name}
    method, _, _ = step1("pi")
    with pytest.raises(ValueError, match="holds ewc; train the previous steps with --regularizer pi"):
        method.carry_over({"ewc": state["ewc"]})


def test_a_run_state_without_every_statistic_is_refused_by_name():
    torch.manual_seed(0)
    info0 = StepInfo(task=StubTask(), step=0, num_old=0, num_classes=4, epochs=1)
    method = build_method("ewc", info0, Tiny([4]), None, {})
    flat = method.state_dict()["ewc"]  # the layout of a run state from before step 0 gathered all three
    with pytest.raises(ValueError, match="holds no ewc, pi, rw statistics"):
        method.load_state_dict(flat)


@pytest.mark.parametrize("cls", [EWC, PI, RW])
def test_resume_continues_the_running_statistics_exactly(cls):
    """A run state taken mid-step and restored into a fresh regularizer gives the uninterrupted run's statistics."""
    model, _ = tiny_pair()
    whole = cls(model, None, Options())
    fake_updates(model, whole, 3, seed=6)
    saved = {k: {n: t.clone() for n, t in v.items()} if isinstance(v, dict) else v
             for k, v in whole.state_dict().items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake_updates(model, whole, 3, seed=7)

    model2, _ = tiny_pair()
    with torch.no_grad():
        for n, p in model2.named_parameters():
            p.copy_(weights[n])
    resumed = cls(model2, None, Options())
    resumed.load_state_dict(saved)
    fake_updates(model2, resumed, 3, seed=7)
    for key, value in whole.carry_state().items():
        if isinstance(value, dict):
            for n in value:
                assert torch.equal(resumed.carry_state()[key][n], value[n]), (key, n)


# ---------------------------------------------------------------- two ranks agree

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_statistics(rank: int, port: int, name: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from segmentation.engine.trainer import Updater

        torch.manual_seed(0)
        model = Tiny([4])
        ddp = nn.parallel.DistributedDataParallel(model)
        method = build_method(name, StepInfo(task=StubTask(), step=0, num_old=0, num_classes=4, epochs=1), model,
                              None, {"reg_iterations": 2})
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        updater = Updater(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0),
                          torch.amp.GradScaler("cpu", enabled=False), after_backward=method.after_backward)
        g = torch.Generator().manual_seed(100 + rank)  # each rank sees other images
        for _ in range(5):
            x, labels = torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 4, (2, 4, 4), generator=g)
            terms = method.losses({"label": labels}, ddp(x), None, 0)
            updater.step(sum(terms.values()), terms, False)
        # step 0 gathers every regularizer's statistics; each must agree across ranks
        out[rank] = {f"{reg}.{k}": {n: t.clone() for n, t in v.items()}
                     for reg, state in method.carry_state().items() for k, v in state.items() if isinstance(v, dict)}
    finally:
        torch_dist.destroy_process_group()


def test_every_rank_ends_with_the_same_statistics():
    # A regularized step 0 gathers all three regularizers' statistics, whichever of them the method is.
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_statistics, args=(_free_port(), "ewc", out), nprocs=2, join=True)
        a, b = dict(out[0]), dict(out[1])
    assert a.keys() == b.keys() and {key.split(".")[0] for key in a} == {"ewc", "pi", "rw"}
    for key in a:
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
        assert any(torch.count_nonzero(t) for t in a[key].values())


# ---------------------------------------------------------------- end to end, 2 gloo ranks

def two_rank_step(root, tmp_path, method: str, step: int, name: str, *extra: str):
    from test_pipeline import TINY, torchrun

    args = [*TINY, "--data_root", str(root), "--task", "6-4", "--step", str(step), "--epochs", "1",
            "--batch_size", "8", "--norm_act", "bn", "--method", method, "--name", name,
            "--checkpoint_dir", str(tmp_path / "ck"), *extra]
    result = torchrun(2, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, tmp_path / "ck" / "step" / "shapes-6-4"


@pytest.fixture(scope="module")
def ft_step0(shapes_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    _, folder = two_rank_step(shapes_root, tmp, "FT", 0, "FT")
    return tmp, folder / "FT_0.pth"


@pytest.mark.parametrize("method, terms", [("LwF", {"ce", "kd"}), ("LwF-MC", {"bce", "icarl"}),
                                           ("ILT", {"ce", "kd", "de"})])
def test_each_distillation_baseline_runs_a_step_under_two_ranks(shapes_root, ft_step0, method, terms):
    tmp, step0 = ft_step0
    result, folder = two_rank_step(shapes_root, tmp, method, 1, method, "--step_ckpt", str(step0))
    log = result.stdout + result.stderr
    assert all(f" {t}=" in log for t in terms), log[-2000:]
    meta = torch.load(folder / f"{method}_1.pth", weights_only=True)["meta"]
    assert meta["method"] == method.lower() and meta["metrics"]["miou_all"] is not None
    # artifacts and results as readable as any file the user writes (issue: not owner-only)
    from segmentation.utils.io import current_umask
    for path in (folder / f"{method}_1.pth", folder / f"{method}_1.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path


@pytest.mark.parametrize("method", ["EWC", "PI", "RW"])
def test_each_regularizer_carries_its_statistics_into_the_next_step(shapes_root, tmp_path, method):
    _, folder = two_rank_step(shapes_root, tmp_path, method, 0, method)
    states = torch.load(folder / f"{method}_0.pth", weights_only=True)["method_state"]
    model = torch.load(folder / f"{method}_0.pth", weights_only=True)["model_state"]
    # step 0 gathers every regularizer's statistics (it trains the same weights whichever asked), so that EWC, PI
    # and RW can share it
    assert set(states) == {"ewc", "pi", "rw"}
    state = states[method.lower()]
    assert state["name"] == method.lower()
    stats = state["fisher"] if method != "PI" else state["score"]
    assert stats.keys() <= model.keys() and "body.mod1.conv1.weight" in stats
    assert all(torch.isfinite(t).all() for t in stats.values())
    result, folder = two_rank_step(shapes_root, tmp_path, method, 1, method)
    assert " reg=" in result.stdout + result.stderr


def test_a_regularizer_after_a_step_without_it_is_refused_with_the_fix(shapes_root, ft_step0):
    from test_pipeline import TINY, run_py

    tmp, step0 = ft_step0
    result = run_py(*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--step", "1", "--epochs", "1",
                    "--batch_size", "8", "--norm_act", "bn", "--method", "EWC", "--name", "late-ewc",
                    "--checkpoint_dir", str(tmp / "ck"), "--step_ckpt", str(step0), cwd=tmp)
    assert result.returncode != 0 and "train the previous steps with --regularizer ewc" in result.stderr
    assert "Traceback" not in result.stderr
