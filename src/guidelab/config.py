"""Typed configs: the Hydra schemas of the three scripts and of every config group, in Hydra's ConfigStore.

A script's own keys, their defaults and their comments live in its primary config (configs/<script>.yaml); the
schema is made from it, each key typed by its value (int, float, bool, str; null: see NULL_TYPES), nested mappings as
nested dataclasses. The network groups are typed by the networks' own signatures. Guidance modes and samplers have no
files: each registered function's generated dataclass is the group option itself (`guidance=<mode>`,
`sampler=<name>`), so its defaults are written once, in the function. Hydra then refuses a wrong type (`seed=abc`,
`train.steps=1.5`) or an unknown key; `check_finite` refuses nan and inf; range checks live in the functions that own
the values.

Three resolvers serve the primary configs: `${default_model:${dataset}}` (the dataset spec's default diffusion model),
`${guidelab_configs:}` (the configs dir, for each script's own presets in configs/<script>/experiment/) and
`${guidelab_groups:<script>}` (the script's own groups and their options, for its --help).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from guidelab.conditions import FIELDS
from guidelab.data import DATASETS, DatasetSpec, dataset_info
from guidelab.errors import GuidelabError
from guidelab.guidance import MODES
from guidelab.models import CLASSIFIERS, RUN_KEYS, UNet
from guidelab.models.diffusers_unet import diffusers_layout
from guidelab.registry import schema_of
from guidelab.sampling import SAMPLERS

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the repository's: the three scripts' configs


NULL_TYPES = {"labels": Any, "reference_num": Optional[int]}  # keys whose default is null; other nulls: Optional[str]
NULL_TYPES |= {name: Any for name in FIELDS}  # attrs.*, negative.*, weights.*: numbers, lists, a class
ANY_TYPES = {"resume": Any}  # keys of more than one type: resume is true, false or auto (checked by check_resume)


def typed(values: dict, name: str, head: tuple = ()) -> type:
    """A dataclass of `head` fields and of `values`, each key typed by its value (int, float, bool, str; null: see
    NULL_TYPES), nested mappings as nested dataclasses."""
    fields = list(head)
    for key, value in values.items():
        if isinstance(value, dict):
            sub = typed(value, f"{name}_{key}")
            fields.append((key, sub, field(default_factory=sub)))
        else:
            kind = NULL_TYPES.get(key, Optional[str]) if value is None else ANY_TYPES.get(key, type(value))
            fields.append((key, kind, value))
    return make_dataclass(name, fields)


def check_resume(cfg) -> None:
    """resume: false (a fresh run; a run dir with results is refused), true (continue the run in the dir), or auto
    (continue it if the dir holds one, else start fresh: what a requeued cluster job passes)."""
    value = cfg.get("resume", False)
    if not (isinstance(value, bool) or value == "auto"):
        raise GuidelabError(f"resume={value} is not one of true, false, auto; e.g. resume=auto for a requeued job")


def _args(fn) -> dict:
    """A network builder's keyword arguments: its parameters after (in_channels, image_size, num_classes)."""
    return dict(list(inspect.signature(fn).parameters.items())[3:])


def network_schema(cls: type, name: str, head: list) -> type:
    """A network group's schema: `head` fields, then the network's keyword arguments typed by their annotations."""
    return schema_of(cls.__init__, name, head, dict(list(inspect.signature(cls).parameters.items())[3:]))


def group_schema(group: str):
    """A group's node type: for registries, `model`, `classifier` and `diffusion`, typed per option elsewhere (a model
    option names its schema, schema/model/unet or schema/model/diffusers, in its own defaults list), Any; else the keys
    of all its option files (configs/<group>/*.yaml), typed by their values."""
    if group in GENERATED or group in ("model", "classifier", "diffusion"):
        return Any
    values = {}
    for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
        values = {**OmegaConf.to_container(OmegaConf.load(option)), **values}
    return typed(values, group)


SCRIPTS = ("train_diffusion", "train_classifier", "sample")
GENERATED = {MODES.group: MODES, SAMPLERS.group: SAMPLERS, "dataset": DATASETS}  # options made from registered code


def groups_of(script: str) -> dict[str, list[str]]:
    """A script's config groups (its primary config's defaults list, schemas left out) and the options of each: the
    registered functions of a registry group, else the files of the script's own presets (configs/<script>/<group>/)
    or of the shared group (configs/<group>/)."""
    entries = OmegaConf.load(CONFIG_DIR / f"{script}.yaml").defaults
    groups = [next(iter(e)).split("@")[0] for e in entries if not isinstance(e, str)]
    return {
        g: sorted(GENERATED[g]) if g in GENERATED else sorted(p.stem for p in group_dir(script, g).glob("*.yaml"))
        for g in groups
        if not g.startswith(("schema", "override "))
    }


def all_groups() -> set[str]:
    """Every config group of the three scripts (a group of another script is refused by name)."""
    return {g for script in SCRIPTS for g in groups_of(script)}


def group_dir(script: str, group: str) -> Path:
    """Where a file-backed group's options live: the script's own presets, or the shared group."""
    return CONFIG_DIR / script / group if (CONFIG_DIR / script / group).is_dir() else CONFIG_DIR / group


def help_groups(script: str) -> str:
    """The --help listing of a script's own groups and their options (Hydra's lists every group it can find)."""
    return "\n".join(f"{group}: {', '.join(options)}" for group, options in groups_of(script).items())


def dataset_schema(spec: DatasetSpec) -> type:
    """The option dataset=<name>: the directory of its files, the training resolution (native by default), whether
    torchvision may download them (a set that is never downloaded, download=None in its spec, has no such key), and
    the set's own keys typed by their defaults (`dataset=folder`: channels, skip_bad, holdout, split_seed; see
    guidelab.data)."""
    head = [("name", str, spec.name), ("root", Optional[str], None), ("image_size", int, spec.image_size)]
    download = [] if spec.download is None else [("download", bool, spec.download)]
    own = [(key, type(default), default) for key, default in spec.options.items()]
    return make_dataclass(f"dataset_{spec.name}", [*head, *download, *own])


def script_schema(script: str) -> type:
    """The dataclass of configs/<script>.yaml: its group nodes, then its own keys typed by their values."""
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{script}.yaml"))
    head = [(g, group_schema(g), MISSING) for g in groups_of(script) if g != "experiment"]
    return typed({k: v for k, v in values.items() if k not in ("defaults", "hydra")}, script, head)


def register() -> None:
    """Put every schema into Hydra's ConfigStore and the three resolvers into OmegaConf (again: replaced). Called by
    whatever composes a config (the entry points through guidelab.cli.main, a cluster task, the tests), never on
    import: importing guidelab.config changes no process-wide state."""
    store = ConfigStore.instance()
    for script in SCRIPTS:
        store.store(group="schema", name=script, node=script_schema(script))
    for registry in (MODES, SAMPLERS):  # each function's schema is the group option itself
        for name in registry:
            store.store(group=registry.group, name=name, node=registry.schema(name))
    for name, spec in DATASETS.items():
        store.store(group="dataset", name=name, node=dataset_schema(spec))
    for option in (CONFIG_DIR / "classifier").glob("*.yaml"):  # typed by the network family the option names
        arch = OmegaConf.load(option).get("arch", "unet_encoder")
        head = [
            (k, type(v), MISSING if k in ("name", "noisy") else v) for k, v in RUN_KEYS.items()
        ]  # typed by defaults
        node = network_schema(CLASSIFIERS[arch], f"classifier_{arch}", head) if arch in CLASSIFIERS else Any
        store.store(group="schema/classifier", name=option.stem, node=node)
    store.store(group="schema/model", name="unet", node=network_schema(UNet, "model", [("name", str, MISSING)]))
    head = [("name", str, MISSING), ("arch", str, "diffusers")]  # model options name their schema in their defaults
    store.store(
        group="schema/model",
        name="diffusers",
        node=schema_of(diffusers_layout, "model_diffusers", head, _args(diffusers_layout)),
    )
    for option in (CONFIG_DIR / "diffusion").glob("*.yaml"):  # each its own keys (pretrained: the model, no T)
        values = OmegaConf.to_container(OmegaConf.load(option))
        store.store(group="schema/diffusion", name=option.stem, node=typed(values, f"diffusion_{option.stem}"))
    OmegaConf.register_new_resolver("default_model", lambda name: dataset_info(name).default_model, replace=True)
    OmegaConf.register_new_resolver("guidelab_configs", lambda: str(CONFIG_DIR), replace=True)
    OmegaConf.register_new_resolver("guidelab_groups", help_groups, replace=True)


FLOAT32_MAX = 3.4028234663852886e38  # the networks, noise and images are float32 (or bf16, of the same range)


def check_finite(cfg, prefix: str = "") -> None:
    """Refuse nan and inf anywhere in the config (no key of guidelab means anything by them), floats beyond float32's
    range (they become inf where guidelab computes) and integers beyond int64's (torch's widest)."""
    items = cfg.items() if isinstance(cfg, (DictConfig, dict)) else enumerate(cfg)
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(cfg, (DictConfig, dict)) else f"{prefix[:-1]}[{key}]"
        if isinstance(value, (DictConfig, ListConfig, dict, list)):
            check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise GuidelabError(f"{name} is {value}; give it a finite number")
        elif isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise GuidelabError(f"{name}={value:g} is beyond float32's range (3.4e38); give a smaller number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise GuidelabError(f"{name}={value} is beyond int64's range (9.2e18); give a smaller number")
