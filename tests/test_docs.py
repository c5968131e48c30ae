"""The docs are true where they show commands and tables: every `python <script>.py ...` line of README.md and docs/
passes the script's own command-line checks as typed (group options, keys, types, value checks of every sweep job),
and the results row documented in docs/outputs.md is the schema's (guidelab.results.ROW)."""

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, check_command_line
from guidelab.results import ROW, doc_table

SCRIPTS = ("train_diffusion.py", "train_classifier.py", "sample.py")
# Commands whose check needs something this machine lacks on purpose: the documented error is the expected outcome.
NEEDS_FILES = {
    "metrics.inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth": "Inception weights",
    "dataset.root=/path/to/pets": "dataset.root /path/to/pets does not exist",  # the reader's image folder
    "ckpt=diffusers:my-ddpm": "my-ddpm is not a directory",  # the reader's diffusers model
    "diffusion.model=diffusers:my-ddpm": "my-ddpm is not a directory",
    "ckpt=diffusers:ddpm-cifar10-32": "ddpm-cifar10-32 is not a directory",  # fetched where there is a network
    "diffusion.model=diffusers:ddpm-cifar10-32": "ddpm-cifar10-32 is not a directory",
}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script, arguments) of every command line in the code blocks of README.md and docs/*.md."""
    found = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        blocks = re.findall(r"```\n(.*?)```", page.read_text(), re.S)
        for block in blocks:
            for line in block.replace("\\\n", " ").splitlines():
                if not line.startswith(("python ", "torchrun ")):
                    continue
                words = shlex.split(line.split(" #")[0], posix=True)
                script = next((w for w in words if w in SCRIPTS), None)
                if script and words[0] in ("python", "torchrun"):
                    found.append((page.name, script, words[words.index(script) + 1 :]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS) and len(COMMANDS) > 40


@pytest.mark.parametrize("page,script,args", COMMANDS, ids=[f"{p}:{s} {' '.join(a)}"[:90] for p, s, a in COMMANDS])
def test_every_documented_command_passes_the_scripts_checks(page, script, args, tmp_path, monkeypatch):
    """As typed, in a directory whose outputs/ holds a diffusion run (for `ckpt=latest`); `...` and PATH stand for
    the reader's checkpoint paths, which are only opened once the run starts."""
    run = tmp_path / "outputs" / "train_diffusion" / "RUN"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / ".hydra" / "config.yaml").write_text("model: {name: unet16}\ndataset: {name: mnist5k, image_size: 16}\n")
    monkeypatch.chdir(tmp_path)
    args = [a for a in args if a not in ("--help", "--cfg", "job")]
    line = check_command_line(script, *args)
    expected = [why for arg, why in NEEDS_FILES.items() if arg in args]
    assert any(why in line for why in expected) or (not expected and line == ""), f"{page}: {script} {args}\n{line}"


def test_the_readme_shows_training_on_your_own_images_and_sampling_them():
    """The front page is where a user looks for their own data: a dataset=folder training and a sampling by class
    name, both among the checked commands."""
    readme = [(script, args) for page, script, args in COMMANDS if page == "README.md"]
    assert any(s == "train_diffusion.py" and "dataset=folder" in a for s, a in readme), readme
    assert any(s == "sample.py" and any(x.startswith("labels=[") for x in a) for s, a in readme), readme


def test_outputs_md_shows_the_results_row_as_the_schema_defines_it():
    """docs/outputs.md's results-row table is the schema's, line for line (names, where shown, texts): the schema is
    the source; `python -m guidelab.results` prints the table to paste."""
    text = (REPO / "docs" / "outputs.md").read_text()
    start = text.index("| column | csv / md | what |")
    shown = text[start:].split("\n\n")[0].strip()
    assert shown == doc_table(), (
        "docs/outputs.md's results row differs from the schema: paste `python -m guidelab.results`"
    )
    assert re.findall(r"^\| `(\w+)`", shown, re.M) == [c.name for c in ROW]
    assert Path(REPO / "README.md").read_text().count("\n") <= 200  # the front door stays short
