"""Print a merged sweep's results.csv as the condensed table of docs/results.md: per row the method (its sweep dir and
options), s, the network evaluations, the measured compute per sample, FID and the three judges' accuracies, with a
flag where two judges differ by more than 3 points.

    python scripts/study_table.py OUT/cg_2022/results.csv
"""

import csv
import sys

FAMILY = {"evaluator": "ResNet", "evaluator_vgg": "VGG", "evaluator_mixer": "Mixer"}  # the judges' config names
FLAG = 0.03  # judges further apart than this are flagged (rows where they disagree by more than 3 points)


def _f(value: str, digits: int) -> str:
    return "" if value in ("", None) else f"{float(value):.{digits}f}"


def main(path: str) -> None:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    judge = []  # the two neural judges' names, the same in every row (their families head the columns)
    for key in ("evaluator", "evaluator_2"):
        names = {r[key] for r in rows}
        if len(names) != 1:
            raise SystemExit(f"{path}: the rows have different {key}s {sorted(names)}; one table per pair of judges")
        judge.append(FAMILY.get(name := names.pop(), name or "(none)"))
    print(
        "| method | s | UNet NFE | classifier NFE | GFLOPs / sample | s / sample | FID "
        f"| acc. {judge[0]} | acc. {judge[1]} | acc. k-NN | judges apart |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sweep = r["run"].split("/")[0]
        entropy = "entropy_scale" if "entropy_scale=True" in (r["options"] or "") and "entropy" not in sweep else ""
        extra = " ".join(x for x in (r["sampler_options"], entropy) if x)
        name = sweep + (f" ({extra})" if extra and extra not in sweep else "")
        judges = [float(r[k]) for k in ("accuracy", "accuracy_2", "accuracy_knn") if r[k] not in ("", None)]
        apart = max(judges) - min(judges) if judges else 0.0
        print(
            f"| {name} | {_f(r['s'], 3).rstrip('0').rstrip('.')} | {_f(r['nfe'], 0)} | {_f(r['classifier_nfe'], 0)} "
            f"| {_f(r['gflops_per_sample'], 3)} | {_f(r['seconds_per_sample'], 3)} | {_f(r['fid'], 2)} "
            f"| {_f(r['accuracy'], 3)} | {_f(r['accuracy_2'], 3)} | {_f(r['accuracy_knn'], 3)} "
            f"| {'**' + format(apart, '.3f') + '**' if apart > FLAG else format(apart, '.3f')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
