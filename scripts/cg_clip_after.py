"""sample.py with the other order of clipping and classifier guidance, for the measurement in docs/results.md.

guidelab corrects the eps of the clipped x_0 prediction and does not clip again (guided-diffusion's order). This
runs `sample.py` with the order guidelab used before: the classifier correction first, then x_0 from the corrected
eps clipped to [-1, 1] and eps recomputed from it, which undoes the part of the push that leaves the data range.

    python scripts/cg_clip_after.py -m experiment=demo guidance=cg scale=3,10,20 ckpt=... classifier_ckpt=...
"""

import runpy
import sys
from pathlib import Path

import guidelab.sampling as sampling
from guidelab.diffusion import gather


def correct_then_clip(diffusion, x, t, out, clip_x0, eps_correction=True):
    eps = out.eps
    if out.score is not None and eps_correction:
        eps = eps - gather((1 - diffusion.abar).sqrt(), t, x) * out.score
    if out.x0 is not None:
        return (out.x0.clamp(-1, 1) if clip_x0 else out.x0), eps
    x0 = diffusion.predict_x0(x, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = diffusion.eps_from_x0(x, t, x0)
    return x0, eps


if __name__ == "__main__":
    sampling._x0_and_eps = correct_then_clip
    root = Path(__file__).resolve().parents[1]
    sys.argv = [str(root / "sample.py")] + sys.argv[1:]
    runpy.run_path(str(root / "sample.py"), run_name="__main__")
