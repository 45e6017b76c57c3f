"""A method's own flags: each method declares them in its file as a frozen dataclass (`Method.Options`).

Every field is a run.py flag of the same name. The parser gets one argument group per options class (a subclass's
group holds only the fields it adds), so `--help` lists each method's flags under its name. A flag shared by
unrelated methods (`--alpha`: MiB's KD scale and WILSON's label smoothing) is one argument whose help gives each
meaning. On the command line every method flag defaults to None ("not given"); config.py then fills it from the
dataset file, the method's preset (`Method.flag_defaults`) and the field's default, and refuses a flag that the
chosen method does not read.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


def option(default: Any, help: str, *, type: Callable[[str], Any] | None = None,
           choices: tuple[Any, ...] | None = None) -> Any:
    """A valued flag (`--loss_kd 10`); `type` defaults to the type of `default`."""
    return field(default=default, metadata={"help": help, "type": type, "choices": choices})


def switch(default: bool, help: str, *, negatable: bool = True) -> Any:
    """An on/off flag: `--unce` / `--no-unce` (MiB's scripts pass the bare `--unce`); not negatable: only
    `--reg_no_normalize`, for a flag whose name already says "no"."""
    return field(default=default, metadata={"help": help, "switch": True, "negatable": negatable})


@dataclass(frozen=True)
class NoOptions:
    """No flags of its own."""


def own_fields(options_cls: type) -> list[dataclasses.Field]:
    """The fields an options class adds to its dataclass bases."""
    inherited = {f.name for base in options_cls.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}
    return [f for f in dataclasses.fields(options_cls) if f.name not in inherited]


def option_names(options_cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(options_cls))


def group_title(options_cls: type) -> str:
    """The first line of the options class's docstring (its other lines describe the group in --help)."""
    return (options_cls.__doc__ or options_cls.__name__).strip().splitlines()[0].rstrip(".")


def group_description(options_cls: type) -> str | None:
    lines = (options_cls.__doc__ or "").strip().splitlines()[1:]
    return " ".join(line.strip() for line in lines if line.strip()) or None


def show(value: Any) -> str:
    if callable(value):
        return str(getattr(value, "preset_text", value.__name__))
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def add_method_flags(parser: argparse.ArgumentParser, options_classes: Iterable[type],
                     presets: Callable[[str], str], readers: Callable[[type], list[str]]) -> dict[str, list[type]]:
    """One argument group per options class; returns flag name -> the options classes that declare it.
    `presets(flag)` describes the methods' values of a flag for its help (e.g. "lwf 100, ilt 100"); `readers(cls)`
    names the methods that read an options class's flags (derived from the registry, so it cannot go stale)."""
    declared: dict[str, list[tuple[type, dataclasses.Field]]] = {}
    order: list[type] = []
    for cls in options_classes:
        if cls in order:
            continue
        for base in reversed(cls.__mro__):
            if dataclasses.is_dataclass(base) and base not in order:
                order.append(base)
    for cls in order:
        for f in own_fields(cls):
            declared.setdefault(f.name, []).append((cls, f))
    groups: dict[type, argparse._ArgumentGroup] = {}
    for cls in order:
        fields_here = [f for f in own_fields(cls) if declared[f.name][0][0] is cls]
        if not fields_here:
            continue
        description = " ".join(filter(None, [f"Read by {', '.join(readers(cls))}.", group_description(cls)]))
        group = groups.setdefault(cls, parser.add_argument_group(f"method: {group_title(cls)}", description))
        for f in fields_here:
            add_flag(group, f.name, declared[f.name], presets(f.name))
    return {name: [cls for cls, _ in owners] for name, owners in declared.items()}


def add_flag(group: argparse._ArgumentGroup, name: str, owners: list[tuple[type, dataclasses.Field]],
             presets: str) -> None:
    kinds = {("switch" if f.metadata.get("switch") else "value") for _, f in owners}
    if len(kinds) > 1:
        raise TypeError(f"--{name} is an on/off flag in one method and takes a value in another")
    if len(owners) == 1:
        help_text = owners[0][1].metadata["help"] + f" [default {show(owners[0][1].default)}"
    else:
        help_text = "; ".join(f"{group_title(cls)}: {f.metadata['help']}" for cls, f in owners)
        help_text += " [default " + ", ".join(f"{group_title(cls)} {show(f.default)}" for cls, f in owners)
    help_text += (f"; presets: {presets}]" if presets else "]")
    first = owners[0][1]
    if first.metadata.get("switch"):
        action = argparse.BooleanOptionalAction if first.metadata.get("negatable", True) else "store_const"
        extra = {} if action is argparse.BooleanOptionalAction else {"const": True}
        group.add_argument(f"--{name}", action=action, default=None, help=help_text, **extra)
        return
    value_type = first.metadata.get("type") or (type(first.default) if first.default is not None else str)
    group.add_argument(f"--{name}", type=value_type, default=None, choices=first.metadata.get("choices"),
                       help=help_text)


def resolve_options(options_cls: type, layers: list[dict[str, Any]], flags: dict[str, Any]) -> Any:
    """The options object: each field from the first layer holding a non-None value for it (a callable is a preset
    computed from `flags`, the run's flags resolved so far), else the field's default. Resolved values are added to
    `flags`, in field order."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(options_cls):
        value = None
        for layer in layers:
            candidate = layer.get(f.name)
            if candidate is not None:
                value = candidate(flags) if callable(candidate) else candidate
                break
        values[f.name] = f.default if value is None else value
        flags[f.name] = values[f.name]
    return options_cls(**values)
