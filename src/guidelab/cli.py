"""The entry points' shared wrapper: checks the command line before Hydra writes anything, runs the task in the Hydra
run dir, and turns a GuidelabError into one line on stderr and exit status 2."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig

from guidelab.errors import GuidelabError

_OVERRIDE = re.compile(r"^(?:\+\+|\+|~)?([\w.]+)=(.*)$")


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight(argv: list[str], config_dir: Path, groups: tuple[str, ...], protect: str) -> None:
    """Refuse, before Hydra creates or writes the run dir, (a) an unknown option of a config group, listing the valid
    ones, and (b) an explicit hydra.run.dir that already holds results (`protect` names them: "checkpoints" or
    "samples") unless resume=true."""
    overrides = dict(m.groups() for a in argv if (m := _OVERRIDE.match(a)))
    multirun = "-m" in argv or "--multirun" in argv
    for group in groups:
        if group not in overrides:
            continue
        valid = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
        values = overrides[group].split(",") if multirun else [overrides[group]]
        for value in values:
            if value not in valid:
                fail(f"unknown {group} {value!r}; valid: {', '.join(valid)} (files in configs/{group}/)")
    run_dir = overrides.get("hydra.run.dir")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not run_dir and not multirun:
        fail("under torchrun pass hydra.run.dir=DIR, so that every rank writes to the same run dir")
    if run_dir and not multirun:
        run_dir = Path(run_dir)
        ancestor = run_dir
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
            fail(f"cannot create the run dir {run_dir}: {ancestor} is not a writable directory; "
                 "choose another hydra.run.dir")
        if protect == "checkpoints" and overrides.get("resume", "false").lower() != "true":
            from guidelab.train import refuse_overwrite

            try:
                refuse_overwrite(run_dir)
            except GuidelabError as e:
                fail(str(e))
        if protect == "samples" and (run_dir / "samples.npz").exists():
            fail(f"{run_dir} already holds samples.npz of another sampling run; choose another hydra.run.dir")


def check_overrides(argv: list[str], config_dir: Path, config_name: str) -> None:
    """Hydra's own parse and composition errors, turned into one line before Hydra starts: a malformed override, an
    unknown key. (A sweep's values are only parsed: composing needs one value per key.)"""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, OverrideParseException

    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]  # not flag values
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        fail(f"malformed override: {_one_line(e)}; write overrides as key=value, e.g. scale=3.0")
    if "-m" in argv or "--multirun" in argv or any(o.is_sweep_override() for o in parsed):
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
            compose(config_name=config_name, overrides=[o for o in overrides if not o.startswith("hydra.")])
    except ConfigCompositionException as e:
        unknown = re.match(r"Could not override '([^']+)'", str(e))
        if unknown and "not in struct" in str(e.__cause__):
            fail(f"unknown key {unknown.group(1)!r} for {config_name}.py; `python {config_name}.py --cfg job` lists "
                 "every key")
        cause = f" ({_one_line(e.__cause__)})" if e.__cause__ else ""
        fail(f"{_one_line(e)}{cause}; `python {config_name}.py --cfg job` lists every key")


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def expand_aliases(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """`eval=true` -> `eval.enabled=true`: a switch that also has sub-keys (eval.num_samples) stays short to type."""
    out = []
    for arg in argv:
        m = _OVERRIDE.match(arg)
        out.append(f"{aliases[m.group(1)]}={m.group(2)}" if m and m.group(1) in aliases else arg)
    return out


def main(config_dir: Path, config_name: str, task: Callable, groups: tuple[str, ...], protect: str,
         aliases: dict[str, str] | None = None) -> None:
    """Run `task(cfg, run_dir)` under Hydra with the primary config `config_name` from `config_dir`."""
    sys.argv[1:] = expand_aliases(sys.argv[1:], aliases or {})
    preflight(sys.argv[1:], config_dir, groups, protect)
    check_overrides(sys.argv[1:], config_dir, config_name)

    @hydra.main(config_path=str(config_dir.resolve()), config_name=config_name, version_base="1.3")
    def _run(cfg) -> None:
        try:
            task(cfg, Path(HydraConfig.get().runtime.output_dir))
        except GuidelabError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")

    _run()
