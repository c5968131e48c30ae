"""The entry points' shared wrapper: checks the command line before Hydra writes anything (group options, types, nan,
every value check, for each job of a sweep), runs the task in the Hydra run dir, and turns a GuidelabError into one
line on stderr and exit status 2."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig

from guidelab import config
from guidelab.checkpoint import refuse_overwrite
from guidelab.errors import GuidelabError, one_line

_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?([\w.]+)=(.*)$")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str], config_dir: Path, config_name: str, protect: str) -> None:
    """Refuse, before Hydra creates or writes the run dir, (a) an unknown option of a config group, listing the valid
    ones, and (b) an explicit hydra.run.dir that already holds results (`protect` names them: "checkpoints" or
    "samples") unless resume=true."""
    overrides = dict(m.groups() for a in argv if (m := _OVERRIDE.match(a)))
    multirun = "-m" in argv or "--multirun" in argv
    groups = config.groups_of(config_name)
    for key in overrides:
        if key not in groups and (config_dir / key).is_dir():
            fail(
                f"{key}= is not a config group of {config_name}.py (its groups: {', '.join(groups)}); "
                f"{key} options belong to another script"
            )
    for group, where in groups.items():
        if group not in overrides:
            continue
        valid = sorted(p.stem for p in where.glob("*.yaml"))
        for value in overrides[group].split(",") if multirun else [overrides[group]]:
            if value not in valid:
                fail(
                    f"unknown {group} {value!r}; valid: {', '.join(valid)} (files in {where.relative_to(config_dir.parent)}/)"
                )
    run_dir = overrides.get("hydra.run.dir")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not run_dir and not multirun:
        fail("under torchrun pass hydra.run.dir=DIR, so that every rank writes to the same run dir")
    if run_dir and not multirun:
        run_dir = Path(run_dir)
        ancestor = run_dir
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            fail(
                f"cannot create the run dir {run_dir}: {ancestor} is not a writable directory; "
                "choose another hydra.run.dir"
            )
        if protect == "checkpoints" and overrides.get("resume", "false").lower() != "true":
            try:
                refuse_overwrite(run_dir)
            except GuidelabError as e:
                fail(str(e))
        if protect == "samples" and (run_dir / "samples.npz").exists():
            fail(f"{run_dir} already holds samples.npz of another sampling run; choose another hydra.run.dir")


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of every job the command line asks for (one, or a sweep's cartesian product), expanded by
    the splitter of Hydra's basic sweeper itself; hydra.* overrides left out."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]  # not flag values
    for added in [a for a in overrides if a[0] in "+~" and not a.startswith(("+hydra", "~hydra"))]:
        fail(
            f"{added}: guidelab's configs hold exactly the keys their code reads, so none is added (+) or deleted (~); "
            "set an existing key with key=value (`--cfg job` lists them)"
        )
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        fail(f"malformed override: {one_line(e)}; write overrides as key=value, e.g. scale=3.0")
    (batch,) = BasicSweeper.split_arguments([o for o in parsed if not o.get_key_element().startswith("hydra.")], None)
    return batch


def check_jobs(argv: list[str], config_dir: Path, config_name: str, check: Callable | None) -> None:
    """Compose every job's config as Hydra will, then refuse in one line, before any job runs: a malformed override,
    an unknown key, a value of the wrong type (Hydra's structured configs), nan or inf, and whatever `check(cfg)`
    refuses (the script's value checks)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    all_jobs = jobs(argv)
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        for job in all_jobs:
            where = f" (in the job {' '.join(job)})" if len(all_jobs) > 1 else ""
            try:
                cfg = compose(config_name=config_name, overrides=job)
                config.check_finite(cfg)
                if check is not None:
                    check(cfg)
            except GuidelabError as e:
                fail(f"{e}{where}")
            except ConfigCompositionException as e:
                fail(_composition_error(e, config_name) + where)


def _composition_error(e: Exception, config_name: str) -> str:
    hint = f"`python {config_name}.py --cfg job` lists every key"
    unknown = re.match(r"Could not override '([^']+)'", str(e))
    if unknown and "not in" in str(e.__cause__):
        return f"unknown key {unknown.group(1)!r} for {config_name}.py; {hint}"
    typed = re.match(r"Error merging override (\S+)", str(e))
    if typed and e.__cause__ is not None:
        return f"{typed.group(1)}: {str(e.__cause__).splitlines()[0]}; {hint}"
    return f"{one_line(e)}{f' ({one_line(e.__cause__)})' if e.__cause__ else ''}; {hint}"


def expand_aliases(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """`eval=true` -> `eval.enabled=true`: a switch that also has sub-keys (eval.num_samples) stays short to type."""
    out = []
    for arg in argv:
        m = _OVERRIDE.match(arg)
        out.append(f"{aliases[m.group(1)]}={m.group(2)}" if m and m.group(1) in aliases else arg)
    return out


def main(
    config_dir: Path,
    config_name: str,
    task: Callable,
    protect: str,
    check: Callable | None = None,
    aliases: dict[str, str] | None = None,
) -> None:
    """Run `task(cfg, run_dir)` under Hydra with the primary config `config_name` from `config_dir`; `check(cfg)` runs
    on every job's config before the first job starts."""
    config.register(config_dir)
    sys.argv[1:] = expand_aliases(sys.argv[1:], aliases or {})
    preflight(sys.argv[1:], config_dir, config_name, protect)
    check_jobs(sys.argv[1:], config_dir, config_name, check)

    @hydra.main(config_path=str(config_dir.resolve()), config_name=config_name, version_base="1.3")
    def _run(cfg) -> None:
        try:
            task(cfg, Path(HydraConfig.get().runtime.output_dir))
        except GuidelabError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")

    _run()
