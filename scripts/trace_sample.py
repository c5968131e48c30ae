"""Trace one `python sample.py guidance=cfg` run (experiment=smoke) and count its back-and-forth: how often control
enters sample.py from elsewhere (Hydra, the package), how many calls sample.py makes down into the package, and how
many calls go up the layering (a guidelab module calling a higher module or the script: callbacks). The layers are
ORDER of REPO's tests/test_architecture.py, so a checkout of another commit traces with its own.

    python scripts/trace_sample.py REPO CKPT OUT_DIR     # CKPT: a train_diffusion.py experiment=smoke checkpoint
"""

import os
import re
import runpy
import sys
from pathlib import Path

REPO, CKPT, OUT = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3]
ORDER = re.findall(
    r'"(\w+)"', re.search(r"ORDER = \[(.*?)\]", (REPO / "tests/test_architecture.py").read_text(), re.S)[1]
)
PACKAGE, SCRIPT = str(REPO / "src" / "guidelab") + "/", str(REPO / "sample.py")
stats = {"entries into sample.py": 0, "calls from sample.py down": 0, "calls up the layers": 0}
edges: set = set()


def layer(filename: str) -> int | None:
    """The script above everything; a guidelab module at its place in ORDER; anything else None."""
    if filename == SCRIPT:
        return len(ORDER)
    if filename.startswith(PACKAGE):
        name = filename[len(PACKAGE) :].split("/")[0].removesuffix(".py")
        return ORDER.index(name) if name in ORDER else None
    return None


def profile(frame, event, arg):
    if event != "call":
        return
    callee, caller = frame.f_code.co_filename, frame.f_back.f_code.co_filename if frame.f_back else ""
    up, down = layer(callee), layer(caller)
    stats["entries into sample.py"] += callee == SCRIPT and caller != SCRIPT
    stats["calls from sample.py down"] += caller == SCRIPT and callee != SCRIPT and up is not None
    if down is not None and up is not None and caller != SCRIPT and up > down:
        stats["calls up the layers"] += 1
        edges.add(f"{Path(caller).stem} -> {Path(callee).stem}")


sys.path.insert(0, str(REPO / "src"))
os.chdir(OUT)
sys.argv = ["sample.py", "experiment=smoke", f"ckpt={CKPT}", "guidance=cfg", "scale=3", "progress=false"]
sys.argv.append(f"hydra.run.dir={OUT}/run")
sys.setprofile(profile)
try:
    runpy.run_path(SCRIPT, run_name="__main__")
except SystemExit:
    pass
sys.setprofile(None)
print(stats, "up:", ", ".join(sorted(edges)))
