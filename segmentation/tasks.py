"""Class-incremental tasks: which dataset classes arrive at which step.

Every dataset has one TOML file, `tasks/<dataset>.toml` (the folder can be moved with $CISS_TASKS_DIR or the
`tasks_dir` argument):

    dataset = "voc"
    has_background = true              # class id 0 is background and must be in step 0
    classes = ["background", ...]      # names indexed by raw dataset class id
    ignore = [12, 26]                  # optional: raw ids no annotation uses; the loader maps them to 255
    [aliases]
    "15-5s" = "15-1"                   # other repos' names of the same split
    [tasks."15-1"]
    steps = ["0-15", [16], [17], [18], [19], [20]]
    cities = [["aachen", ...], ...]    # optional: the training images of each step come from these cities only
                                       # (CIL trains each stage on its own Cityscapes cities)
    groups = [[0, 1, 8], "2-7"]        # optional, one-step tasks only: the "Task k" groups of the evaluation
                                       # (CIL scores its offline model on the stages of its incremental task)
    [defaults]                         # optional: run.py flags for this dataset, where not given on the command
    crop_size = [64, 128]              # line; [defaults.<method>] for one method only (CIL's own setup)
    [layout]                           # your own dataset (no loader in Python): how its files sit under
    kind = "folders"                   # --data_root; see segmentation/datasets/folders.py

A step is a list of ids and/or inclusive range strings ("0-15"), or a single range string. The order inside a step
is kept: the learning order (model output channel k <-> class id) is the concatenation of the steps, which matters
for the shuffled-order tasks (15-1_b..15-1_w).

Every task is validated when it is loaded, so a typo in a file fails at `load_task`, naming the file and the task,
instead of silently training on a wrong split.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - python 3.10
    import tomli as tomllib

TASKS_DIR_ENV = "CISS_TASKS_DIR"
_DEFAULT_TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


class TaskError(ValueError):
    """Unknown dataset/task, invalid task file or step out of range; the message says what is valid."""


@dataclass(frozen=True)
class Task:
    dataset: str                          # "voc", "ade", "coco-voc", "cityscapes", "shapes"
    name: str                             # canonical name ("15-1"; the alias "15-5s" resolves to it)
    class_names: tuple[str, ...]          # indexed by raw dataset class id
    steps: tuple[tuple[int, ...], ...]    # raw class ids arriving at each step, step 0 first
    has_background: bool                  # id 0 is background (all but cityscapes)
    ignore_ids: tuple[int, ...] = ()      # raw ids that are never a class: the loader maps them to 255
    train_cities: tuple[tuple[str, ...], ...] | None = None  # per step: the cities its training images come from
    groups: tuple[tuple[int, ...], ...] | None = None  # one-step tasks: the evaluation's "Task k" groups (raw ids)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def num_classes(self) -> int:
        """Number of raw class ids of the dataset (including background and unused ids)."""
        return len(self.class_names)

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.name}"

    def check_step(self, step: int) -> None:
        """Raise TaskError unless 0 <= step < num_steps."""
        if step < 0:
            raise TaskError(f"--step {step} is negative; steps of {self.label} are 0..{self.num_steps - 1}")
        if step >= self.num_steps:
            raise TaskError(f"--step {step} is beyond the last step ({self.num_steps - 1}) of {self.label}")

    def new_classes(self, step: int) -> tuple[int, ...]:
        self.check_step(step)
        return self.steps[step]

    def old_classes(self, step: int) -> tuple[int, ...]:
        self.check_step(step)
        return tuple(c for s in self.steps[:step] for c in s)

    def seen_classes(self, step: int) -> tuple[int, ...]:
        self.check_step(step)
        return tuple(c for s in self.steps[: step + 1] for c in s)

    def classes_per_step(self, step: int) -> list[int]:
        self.check_step(step)
        return [len(s) for s in self.steps[: step + 1]]

    def seen_class_names(self, step: int) -> list[str]:
        return [self.class_names[c] for c in self.seen_classes(step)]

    def group_parts(self, step: int) -> list[tuple[int, ...]]:
        """CIL's "Task k" groups at a step, as learning-order indices: each step's classes, or the task file's
        `groups` (a one-step task: the offline model scored on an incremental task's stages)."""
        order = self.seen_classes(step)
        parts = self.groups if self.groups is not None else self.steps[:step + 1]
        return [tuple(order.index(c) for c in part) for part in parts]


def tasks_dir(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get(TASKS_DIR_ENV)
    return Path(env) if env else _DEFAULT_TASKS_DIR


def list_datasets(tasks_dir_: str | Path | None = None) -> list[str]:
    return sorted(p.stem for p in tasks_dir(tasks_dir_).glob("*.toml"))


def list_tasks(dataset: str, tasks_dir_: str | Path | None = None, include_aliases: bool = False) -> list[str]:
    spec = _load_file(_dataset_file(dataset, tasks_dir_))
    names = list(spec.tasks)
    return names + list(spec.aliases) if include_aliases else names


def dataset_defaults(dataset: str, tasks_dir_: str | Path | None = None
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Flag defaults of `tasks/<dataset>.toml`: its [defaults], and its [defaults.<method>] tables by method name.
    Empty for a dataset without a file: the unknown dataset is reported where it is used."""
    try:
        spec = _load_file(_dataset_file(dataset, tasks_dir_))
    except TaskError:
        return {}, {}
    return spec.defaults, spec.method_defaults


def load_task(dataset: str, name: str, tasks_dir_: str | Path | None = None) -> Task:
    """The task `name` (or an alias of it) of `tasks/<dataset>.toml`, validated."""
    spec = _load_file(_dataset_file(dataset, tasks_dir_))
    canonical = spec.aliases.get(name, name)
    if canonical not in spec.tasks:
        valid = ", ".join(spec.tasks)
        aliases = ", ".join(f"{a} (= {t})" for a, t in spec.aliases.items())
        raise TaskError(f"unknown task {name!r} for dataset {dataset!r} ({spec.path}); valid tasks: {valid}"
                        + (f"; aliases: {aliases}" if aliases else ""))
    return spec.tasks[canonical]


# ---- file parsing and validation ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DatasetSpec:
    path: Path
    tasks: dict[str, Task]
    aliases: dict[str, str]
    defaults: dict[str, Any]
    method_defaults: dict[str, dict[str, Any]]
    layout: dict[str, Any] | None
    num_classes: int


def dataset_layout(dataset: str, tasks_dir_: str | Path | None = None) -> tuple[dict[str, Any], int] | None:
    """The [layout] table of `tasks/<dataset>.toml` and the dataset's class count (raw ids 0..n-1), for a dataset
    with no loader of its own; None when the file has none (or there is no file)."""
    try:
        spec = _load_file(_dataset_file(dataset, tasks_dir_))
    except TaskError:
        return None
    return (spec.layout, spec.num_classes) if spec.layout is not None else None


def _dataset_file(dataset: str, tasks_dir_: str | Path | None) -> Path:
    folder = tasks_dir(tasks_dir_)
    path = folder / f"{dataset}.toml"
    if not path.is_file():
        valid = ", ".join(list_datasets(folder)) or f"none: no *.toml in {folder}"
        raise TaskError(f"unknown dataset {dataset!r} (no {path}); valid datasets: {valid}")
    return path


def _load_file(path: Path) -> _DatasetSpec:
    # Cached on the file's content: repeated lookups are free, an edited file is re-read.
    return _load_file_cached(path.resolve(), path.read_bytes())


@lru_cache(maxsize=32)
def _load_file_cached(path: Path, content: bytes) -> _DatasetSpec:
    try:
        data = tomllib.loads(content.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TaskError(f"{path}: not valid TOML: {exc}") from exc
    dataset, classes, has_bg, ignore = _header(path, data)
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, dict) or not raw_tasks:
        raise TaskError(f"{path}: no [tasks.\"<name>\"] tables")
    tasks = {}
    for name, table in raw_tasks.items():
        where = f"{path}, task {name!r}"
        if not isinstance(table, dict) or "steps" not in table:
            raise TaskError(f"{where}: missing `steps = [...]`")
        steps = _parse_steps(where, table["steps"])
        _validate_steps(where, steps, len(classes), has_bg, ignore)
        cities = _parse_cities(where, table.get("cities"), len(steps))
        groups = _parse_groups(where, table.get("groups"), steps)
        tasks[name] = Task(dataset, name, classes, steps, has_bg, ignore, cities, groups)
    aliases = _parse_aliases(path, data.get("aliases", {}), tasks)
    defaults, method_defaults = _parse_defaults(path, data.get("defaults", {}))
    layout = data.get("layout")
    if layout is not None:
        from segmentation.datasets.folders import check_layout

        if not isinstance(layout, dict):
            raise TaskError(f"{path}: [layout] must be a table")
        try:
            check_layout(str(path), layout)
        except ValueError as exc:
            raise TaskError(str(exc)) from exc
    return _DatasetSpec(path, tasks, aliases, defaults, method_defaults, layout, len(classes))


def _parse_cities(where: str, raw: Any, num_steps: int) -> tuple[tuple[str, ...], ...] | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == num_steps and all(
            isinstance(step, list) and step and all(isinstance(c, str) and c for c in step) for step in raw)):
        raise TaskError(f"{where}: `cities` must list, for each of the {num_steps} steps, a non-empty list of "
                        f"city names")
    return tuple(tuple(step) for step in raw)


def _parse_groups(where: str, raw: Any, steps: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...] | None:
    """`groups`: for a one-step task, a partition of its classes into the evaluation's "Task k" groups."""
    if raw is None:
        return None
    if len(steps) != 1:
        raise TaskError(f"{where}: `groups` is for one-step tasks (a task with steps is scored on its steps)")
    groups = _parse_steps(f"{where}, groups", raw)
    flat = [c for group in groups for c in group]
    if sorted(flat) != sorted(steps[0]):
        raise TaskError(f"{where}: `groups` must hold each class of the task exactly once")
    return groups


def _parse_defaults(path: Path, raw: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """[defaults] flag = value pairs, and [defaults.<method>] tables of them (flag names without the dashes)."""
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: [defaults] must be a table of flag = value")
    general = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    per_method = {k.lower(): v for k, v in raw.items() if isinstance(v, dict)}
    return general, per_method


def _header(path: Path, data: dict[str, Any]) -> tuple[str, tuple[str, ...], bool, tuple[int, ...]]:
    dataset = data.get("dataset")
    if dataset != path.stem:
        raise TaskError(f"{path}: `dataset = {dataset!r}` must match the file name ({path.stem!r})")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise TaskError(f"{path}: `classes` must be a non-empty list of class names")
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:  # names key the per-class metrics, so they must be unique
        raise TaskError(f"{path}: duplicate class names {duplicates}")
    has_bg = data.get("has_background")
    if not isinstance(has_bg, bool):
        raise TaskError(f"{path}: `has_background` must be true or false")
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(_is_id(i) and 0 <= i < len(classes) for i in ignore):
        raise TaskError(f"{path}: `ignore` must list class ids in 0..{len(classes) - 1}, got {ignore}")
    if has_bg and 0 in ignore:
        raise TaskError(f"{path}: the background (id 0) cannot be ignored")
    return dataset, tuple(classes), has_bg, tuple(ignore)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_steps(where: str, raw: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{where}: `steps` must be a non-empty list of steps")
    steps = []
    for k, step in enumerate(raw):
        items = [step] if isinstance(step, str) else step
        if not isinstance(items, list):
            raise TaskError(f"{where}: step {k} must be a list of ids/ranges or a range string, got {step!r}")
        ids: list[int] = []
        for item in items:
            ids.extend(_parse_item(f"{where}, step {k}", item))
        if not ids:
            raise TaskError(f"{where}: step {k} is empty")
        steps.append(tuple(ids))
    return tuple(steps)


def _parse_item(where: str, item: Any) -> list[int]:
    if _is_id(item):
        return [item]
    if isinstance(item, str):
        lo, sep, hi = item.partition("-")
        if sep and lo.strip().isdigit() and hi.strip().isdigit() and int(lo) <= int(hi):
            return list(range(int(lo), int(hi) + 1))
        if not sep and item.strip().isdigit():
            return [int(item)]
    raise TaskError(f"{where}: {item!r} is neither a class id nor an increasing range like \"0-15\"")


def _validate_steps(where: str, steps: tuple[tuple[int, ...], ...], num_classes: int, has_bg: bool,
                    ignore: tuple[int, ...]) -> None:
    seen: dict[int, int] = {}
    for k, step in enumerate(steps):
        for c in step:
            if not 0 <= c < num_classes:
                raise TaskError(f"{where}: step {k} has class id {c}, outside the {num_classes} classes "
                                f"(0..{num_classes - 1})")
            if c in ignore:
                raise TaskError(f"{where}: step {k} has class id {c}, which the file lists in `ignore`")
            if c in seen:
                where_else = "twice in that step" if seen[c] == k else f"also in step {seen[c]}"
                raise TaskError(f"{where}: class id {c} appears in step {k} and {where_else}; "
                                "each class must arrive exactly once")
            seen[c] = k
    if has_bg and seen.get(0) != 0:
        raise TaskError(f"{where}: the background (id 0) must be in step 0"
                        + ("" if 0 not in seen else f", not in step {seen[0]}"))
    missing = sorted(set(range(num_classes)) - set(seen) - set(ignore))
    if missing:  # a forgotten class would be trained as background forever; almost always a typo
        raise TaskError(f"{where}: class ids {missing} are in no step (list them in a step or in `ignore`)")


def _parse_aliases(path: Path, raw: Any, tasks: dict[str, Task]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: [aliases] must be a table of \"alias\" = \"task\"")
    for alias, target in raw.items():
        if alias in tasks:
            raise TaskError(f"{path}: alias {alias!r} is also a task name")
        if target not in tasks:
            raise TaskError(f"{path}: alias {alias!r} points to unknown task {target!r}; "
                            f"valid tasks: {', '.join(tasks)}")
    return dict(raw)
