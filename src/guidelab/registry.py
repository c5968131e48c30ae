"""Self-describing registries: a guidance mode or a sampler is one registered function (a dataset too: data.py).

A function's keyword parameters after its `fixed` ones are its config keys, exactly, and their defaults are the
config's defaults: from the signature the registry derives the Hydra schema (a dataclass that config.py stores in the
ConfigStore as the group option itself, so each default is written once and types are Hydra's job). The decorator's
keyword arguments are the entry's traits (what it needs, what `scale` means for it), its defaults of the registry's
shared keys (a sampler's steps and spacing), and the checks of its values (`Range`, `OneOf`, `Above`), which run before
any network is loaded.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field, make_dataclass
from typing import Any, NamedTuple, Optional

from omegaconf import MISSING  # '???': a key the config file must set

from guidelab.errors import GuidelabError


class Range(NamedTuple):
    """A number in [lo, hi] (lo excluded with `open_lo`); None passes (keys whose null means "none")."""

    lo: float
    hi: float = math.inf
    why: str = ""  # what the values mean, appended to the error
    open_lo: bool = False

    def check(self, key: str, value, values: dict) -> None:
        if value is None or (value > self.lo if self.open_lo else value >= self.lo) and value <= self.hi:
            return
        bound = (
            (f"> {self.lo:g}" if self.open_lo else f">= {self.lo:g}")
            if self.hi == math.inf
            else f"in [{self.lo:g}, {self.hi:g}]"
        )
        raise GuidelabError(f"{key} must be {bound}, got {value:g}" + (f"; {self.why}" if self.why else ""))


class OneOf(NamedTuple):
    options: tuple
    why: str = ""

    def check(self, key: str, value, values: dict) -> None:
        if value not in self.options:
            raise GuidelabError(
                f"{key} must be one of {', '.join(map(str, self.options))}, got {value!r}"
                + (f"; {self.why}" if self.why else "")
            )


class Above(NamedTuple):
    """A number above another key of the same entry."""

    other: str
    example: str = ""

    def check(self, key: str, value, values: dict) -> None:
        if not value > values[self.other]:
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            raise GuidelabError(
                f"{key} ({value:g}) must be above {prefix}{self.other} ({values[self.other]:g})"
                + (f"; e.g. {self.example}" if self.example else "")
            )


class Shared(NamedTuple):
    """A config key every entry of a registry has besides its own: its type, its default (an entry may declare its
    own) and its check (None: the type says it all)."""

    type: Any
    default: Any = MISSING
    check: Any = None


class Entry(NamedTuple):
    name: str
    fn: Callable
    params: dict[str, inspect.Parameter]  # the config keys and their defaults
    checks: dict[str, Any]
    traits: dict[str, Any]
    shared: dict[str, Any]  # this entry's defaults of the registry's shared keys


class Registry(dict):
    """name -> Entry. `fixed`: the leading parameters every entry's function takes that are not config keys;
    `shared`: config keys every entry has besides its own ({name: Shared}); `traits`: the traits an entry may declare,
    with their defaults."""

    def __init__(self, group: str, fixed: tuple[str, ...] = (), shared: dict[str, Shared] | None = None, **traits):
        super().__init__()
        self.group, self.fixed, self.shared, self.traits = group, fixed, shared or {}, traits

    def register(self, name: str | None = None, **declared) -> Callable:
        def add(fn: Callable) -> Callable:
            key = name or fn.__name__.lstrip("_")
            params = {p: v for p, v in inspect.signature(fn).parameters.items() if p not in self.fixed}
            unknown = set(declared) - set(params) - set(self.traits) - set(self.shared) - {"scale"}
            assert not unknown, f"{self.group} {key}: {unknown} are neither parameters nor traits"
            traits = {**self.traits, **{k: v for k, v in declared.items() if k in self.traits}}
            shared = {k: v for k, v in declared.items() if k in self.shared}
            checks = {k: v for k, v in declared.items() if k not in self.traits and k not in self.shared}
            self[key] = Entry(key, fn, params, checks, traits, shared)
            return fn

        return add

    def get_entry(self, name: str) -> Entry:
        if name not in self:
            raise GuidelabError(f"unknown {self.group} {name!r}; valid: {', '.join(sorted(self))}")
        return self[name]

    def own(self, values) -> dict:
        """An entry's own keys out of its config node (`values["name"]` names the entry)."""
        return {k: values[k] for k in self.get_entry(values["name"]).params if k in values}

    def check(self, name: str, values: dict) -> None:
        """Run the checks of entry `name` on `values` (see `check_values`)."""
        self.check_values(self.get_entry(name), values)

    def check_values(self, entry: Entry, values: dict) -> None:
        """Run the shared keys' checks and the entry's checks on `values` (its config keys, printed as group.key); a
        check that compares with another key (`Above`) sees that key's default where `values` leaves it out."""
        full = {**{k: p.default for k, p in entry.params.items() if p.default is not p.empty}, **values}
        rules = {**{k: v.check for k, v in self.shared.items() if v.check is not None}, **entry.checks}
        for key, rule in rules.items():
            if key in values:
                rule.check(f"{self.group}.{key}", values[key], full)

    def schema(self, name: str) -> type:
        """The entry's config as a dataclass: `name`, the shared keys (at the entry's defaults), then its own keys with
        their types and defaults."""
        entry = self[name]
        shared = [(k, v.type, entry.shared.get(k, v.default)) for k, v in self.shared.items()]
        return schema_of(entry.fn, f"{self.group}_{name}", [("name", str, name), *shared], entry.params)


def schema_of(fn: Callable, cls_name: str, head: list, params: dict[str, inspect.Parameter]) -> type:
    """A dataclass of `head` fields ((name, type, default) triples) and of fn's parameters `params` with their annotated
    types and defaults: the Hydra schema of a config that feeds fn."""
    hints = typing.get_type_hints(fn)
    fields = [(k, t, config_default(d)) for k, t, d in head]
    fields += [
        (k, _config_type(hints.get(k, Any)), config_default(MISSING if p.default is p.empty else p.default))
        for k, p in params.items()
    ]
    return make_dataclass(cls_name, fields)


def _config_type(hint):
    """A type OmegaConf accepts: `float | None` -> Optional[float], tuples -> lists."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return Optional[_config_type(args[0])] if len(args) == 1 else Any
    if hint is tuple or typing.get_origin(hint) is tuple:
        return list
    return hint


def config_default(value):
    """A dataclass field default: lists and tuples as default factories (mutable defaults are not allowed)."""
    return field(default_factory=lambda: list(value)) if isinstance(value, (list, tuple)) else field(default=value)
