"""The entry points' shared wrapper: checks the command line before Hydra writes anything (group options, types, nan,
every value check, for each job of a sweep), runs the task in the Hydra run dir, and turns a GuidelabError into one
line on stderr and exit status 2. The command line is read through Hydra's public override parser and composed by
Hydra's compose API, exactly as the run will compose it. A run holds its run dir (guidelab.rundir) from before Hydra
writes into it until it ends: a second run into the same dir is refused, every rank of a torchrun job alike."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType

from guidelab import config, dist, rundir, shards
from guidelab.checkpoint import refuse_overwrite
from guidelab.conditions import FIELDS
from guidelab.errors import GuidelabError, one_line

INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--shell-completion", "-sc"}


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str]) -> list[Override]:
    """The overrides of a command line (key=value, ~key; not the flags such as -m or --cfg job, nor their values). A
    malformed one, or a word that is neither (the rest of a value the shell split at a space), is refused in one line;
    where a space or a non-ASCII character is the likely cause, with the quoting that Hydra's grammar accepts."""
    from hydra.errors import OverrideParseException

    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except OverrideParseException as e:
        bad = next((o for o in overrides if not _parses(parser, o)), "")
        words = _with_split_words(argv, bad) if bad else []
        if len(words) > 1 or any(c.isspace() or not c.isascii() for c in bad):
            fail(f"malformed override {' '.join(words)}: {one_line(e)}; {_quoting_hint(words)}")
        fail(f"malformed override: {one_line(e)}; write overrides as key=value, e.g. scale=3.0")
    for i, word in enumerate(argv):
        if word in overrides or word.startswith("-") or (i and argv[i - 1].startswith("-")):  # a flag or its value
            continue
        j = i - 1
        while j >= 0 and argv[j] not in overrides and not argv[j].startswith("-"):
            j -= 1  # back over the words split off with this one, to the override they may belong to
        hint = "write overrides as key=value, e.g. scale=3.0"
        if j >= 0 and argv[j] in overrides:
            split = _with_split_words(argv, argv[j])
            hint = f"if the shell split it off {argv[j]} at a space, {_quoting_hint(split)}"
        fail(f"{word!r} is neither an override (key=value) nor a flag; {hint}")
    return parsed


def _parses(parser, override: str) -> bool:
    from hydra.errors import OverrideParseException

    try:
        parser.parse_overrides([override])
    except OverrideParseException:
        return False
    return True


def _with_split_words(argv: list[str], override: str) -> list[str]:
    """The override and the words after it that are neither overrides nor flags: one value the shell split at spaces."""
    following = itertools.takewhile(
        lambda a: "=" not in a and not a.startswith(("-", "~")), argv[argv.index(override) + 1 :]
    )
    return [override, *following]


def _quoting_hint(words: list[str]) -> str:
    """How to write a value holding spaces or non-ASCII characters (class names): Hydra reads an unquoted value only
    of ASCII letters, digits and a few symbols (its override grammar), so each item goes in double quotes for Hydra,
    and the whole value in single quotes for the shell, which otherwise splits at spaces and drops the quotes."""
    key, _, value = " ".join(words).partition("=")
    if value.startswith("["):
        items = [v.strip().strip("'\"") for v in value.strip("[]").split(",")]
        quoted = "[" + ",".join(json.dumps(v, ensure_ascii=False) for v in items) + "]"
    else:
        quoted = json.dumps(value.strip("'\""), ensure_ascii=False)
    return (
        "a value with a space or a non-ASCII character must reach Hydra in double quotes, and the shell must pass "
        f"it as one word: quote it twice, e.g. {key}='{quoted}'"
    )


def expand_aliases(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """`eval=true` -> `eval.enabled=true`: a switch that also has sub-keys (eval.num_samples) stays short to type."""
    renamed = {o.input_line: o for o in parse(argv) if o.key_or_group in aliases and o.type == OverrideType.CHANGE}
    return [f"{aliases[renamed[a].key_or_group]}={a.split('=', 1)[1]}" if a in renamed else a for a in argv]


def preflight(argv: list[str], config_name: str, protect: str) -> Path | None:
    """Refuse, before Hydra creates or writes the run dir: an added (+) or deleted (~) key; a group of another script;
    and an explicit hydra.run.dir that cannot be written or already holds results (`protect` names them:
    "checkpoints" or "samples") unless resume=true. Returns that explicit run dir (None for a sweep, or where Hydra
    chooses the dir)."""
    overrides = parse(argv)
    multirun = "-m" in argv or "--multirun" in argv
    groups = config.groups_of(config_name)
    for o in overrides:
        if o.type != OverrideType.CHANGE and not o.is_hydra_override():
            fail(
                f"{o.input_line}: guidelab's configs hold exactly the keys their code reads, so none is added (+) or "
                "deleted (~); set an existing key with key=value (`--cfg job` lists them)"
            )
        key = o.key_or_group
        if key not in groups and key in config.all_groups():
            fail(
                f"{key}= is not a config group of {config_name}.py (its groups: {', '.join(groups)}); "
                f"{key} options belong to another script"
            )
    values = {o.key_or_group: o for o in overrides if not o.is_sweep_override()}
    launcher = str(values["hydra/launcher"].value()) if "hydra/launcher" in values else ""
    if launcher in ("slurm", "local") and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        fail(f"hydra/launcher={launcher} needs hydra-submitit-launcher: pip install -e '.[cluster]'")
    run_dir = str(values["hydra.run.dir"].value()) if "hydra.run.dir" in values else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not run_dir and not multirun:
        fail("under torchrun pass hydra.run.dir=DIR, so that every rank writes to the same run dir")
    sweep_dir = str(values["hydra.sweep.dir"].value()) if "hydra.sweep.dir" in values else None
    for where, key in ((run_dir, "hydra.run.dir"), (sweep_dir, "hydra.sweep.dir")):
        if where and (key == "hydra.sweep.dir") == multirun and "${" not in where:
            try:
                rundir.probe(where, key)
            except GuidelabError as e:
                fail(str(e))
    if run_dir and not multirun:
        run_dir = Path(run_dir)
        try:  # a dir another run holds: what it holds is that run's work in progress, whatever the checks below say
            rundir.refuse_held(run_dir)
        except GuidelabError as e:
            fail(str(e))
        resume = "resume" in values and str(values["resume"].value()).lower() in ("true", "auto")
        if protect == "checkpoints" and not resume:
            try:
                refuse_overwrite(run_dir)
            except GuidelabError as e:
                fail(str(e))
        if protect == "samples" and (run_dir / "samples.npz").exists() and not resume:
            fail(
                f"{run_dir} already holds samples.npz of another sampling run; choose another hydra.run.dir "
                "(resume=auto keeps it if it was drawn under the same settings)"
            )
        if protect == "samples":
            try:
                shards.refuse_unresumed(run_dir, resume)
            except GuidelabError as e:
                fail(str(e))
        return None if "${" in str(run_dir) else run_dir  # an interpolated dir is known only once Hydra resolves it
    return None


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of every job the command line asks for: one, or a sweep's cartesian product in the order of
    Hydra's basic sweeper (the first override varies slowest); hydra.* overrides left out."""
    lists = []
    for o in parse(argv):
        if o.is_hydra_override():
            continue
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                fail(f"{o.input_line}: only lists and range() sweeps are supported, e.g. scale=1,2,3")
            lists.append([f"{key}={value}" for value in o.sweep_string_iterator()])
        else:
            lists.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*lists)]


def check_jobs(argv: list[str], config_dir: Path, config_name: str, check: Callable | None) -> None:
    """Compose every job's config as Hydra will, then refuse in one line, before any job runs: a malformed override,
    an unknown group option or key, a value of the wrong type (Hydra's structured configs), nan or inf, and whatever
    `check(cfg)` refuses (the script's value checks)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    all_jobs = jobs(argv)
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        for job in all_jobs:
            where = f" (in the job {' '.join(job)})" if len(all_jobs) > 1 else ""
            try:
                cfg = compose(config_name=config_name, overrides=job)
                config.check_finite(cfg)
                config.check_resume(cfg)
                if check is not None:
                    check(cfg)
            except GuidelabError as e:
                fail(f"{e}{where}")
            except MissingConfigException as e:
                fail(_missing_option(e, config_name) + where)
            except ConfigCompositionException as e:
                fail(_composition_error(e, config_name, job) + where)


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is the allocator's (CPU or CUDA) running out of memory."""
    text = str(e)
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _missing_option(e, config_name: str) -> str:
    """An unknown option of a config group, with the valid ones (and where a file-backed group keeps them)."""
    group, _, value = str(e.missing_cfg_file).rpartition("/")
    if not group:
        return one_line(e)
    where = (
        ""
        if group in config.GENERATED
        else f" (files in {config.group_dir(config_name, group).relative_to(config.CONFIG_DIR.parent)}/)"
    )
    return f"unknown {group} {value!r}; valid: {', '.join(e.options or [])}{where}"


def _composition_error(e: Exception, config_name: str, job: list[str]) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    hint = f"`python {config_name}.py --cfg job` lists every key"
    cause = e.__cause__
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        block = cause.full_key.split(".")[0]
        if block in ("attrs", "negative", "weights"):  # a condition field: name the ones there are
            fields = ", ".join(FIELDS[1:]) + ("" if block == "attrs" else ", and label (the class)")
            hint = f"{block}.* takes {fields}: guidelab.morpho's measurements"
        return f"unknown key {cause.full_key!r} for {config_name}.py; {hint}"
    if isinstance(cause, ValidationError) and cause.full_key:
        given = next((o for o in job if o.split("=", 1)[0] == cause.full_key), cause.full_key)
        return f"{given}: {str(cause).splitlines()[0]}; {hint}"
    return f"{one_line(e)}{f' ({one_line(cause)})' if cause else ''}; {hint}"


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
    config.register()
    dist.adopt_scheduler_env()  # the tasks of a SLURM job step: torchrun's variables from SLURM's
    sys.argv[1:] = expand_aliases(sys.argv[1:], aliases or {})
    if not INFO_FLAGS & set(sys.argv[1:]):  # --help and --cfg only print: nothing to check, nothing is written
        run_dir = preflight(sys.argv[1:], config_name, protect)
        check_jobs(sys.argv[1:], config_dir, config_name, check)
        if run_dir is not None:  # held (rank 0) or joined (ranks > 0) before Hydra writes its .hydra files into it
            try:
                rundir.hold(run_dir)
            except GuidelabError as e:
                fail(str(e))

    @hydra.main(config_path=str(config_dir.resolve()), config_name=config_name, version_base="1.3")
    def _run(cfg) -> None:
        dist.adopt_scheduler_env()  # a submitit launcher's task starts here, not in main()
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            rundir.hold(output_dir)  # a sweep's job, or a dir Hydra chose: held from here (already held: a no-op)
            task(cfg, output_dir)
        except GuidelabError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted")
        except OSError as e:  # a file the run reads or writes: its filesystem said no (full, read-only, gone)
            if e.filename is None:
                raise
            fail(f"{e.filename}: {e.strerror or e}; check the path, its filesystem and its free space")
        except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
            if not out_of_memory(e):
                raise
            fail(
                f"out of memory ({one_line(e)[:160]}); lower the sizes: batch_size (train.batch_size), "
                "dataset.image_size, the network's channels, num_samples or eval.num_samples"
            )
        finally:
            rundir.release(output_dir)  # the next job of a sweep holds its own dir

    _run()
