"""Sample from a trained diffusion UNet with or without guidance, and judge the samples.

    python sample.py guidance=cfg scale=3.0      # ckpt=latest: the newest train_diffusion run under outputs/
    python sample.py ckpt=RUN/checkpoints/last.pt guidance=cg classifier_ckpt=CLS/checkpoints/last.pt scale=3.0

The story: check the config, load the networks (guidelab.networks), draw every batch with the guidance and the sampler
(guidelab.drawing: batch b's noise from seed * 1000003 + b, on DDP rank b % world, each finished batch kept in
RUN/shards so that resume=true after a kill draws only the missing ones), write samples.npz and grid.png, and with
an evaluator the results row (guidelab.results) into metrics.json.
"""

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from guidelab import dist, drawing, networks, results
from guidelab.cli import main
from guidelab.conditions import combinations
from guidelab.drawing import check  # every value check that needs no network (also run for each job of a sweep)
from guidelab.images import save_class_grid


def sample(cfg, run_dir: Path) -> dict:
    """One sampling run into run_dir; returns its results row ({} on the ranks other than 0)."""
    spec = check(cfg)
    device = dist.setup(dist.select_device(cfg.device))
    nets = networks.for_sampling(cfg, spec, device)
    if dist.is_main() and (run_dir / ".hydra").is_dir():  # the run's config records the checkpoints `latest` chose
        OmegaConf.save(OmegaConf.merge(cfg, nets.paths), run_dir / ".hydra" / "config.yaml")
    drawn = drawing.run(cfg, spec, nets, run_dir, device)
    if drawn is None:  # rank 0 gathered every rank's batches
        return {}
    class_names = nets.train_config["data_info"].get("class_names")  # grid row labels
    rows, count = drawn.labels, nets.num_classes  # one grid row per class, or per condition asked (attributes)
    if drawn.request[0] is not None and drawn.request[0].dim() == 2:
        rows, class_names = combinations(drawn.request[0], class_names, nets.num_classes)
        rows, count = np.array(rows), min(len(class_names), 40)  # the first 40 conditions asked
    save_class_grid(drawn.images, rows, count, run_dir / "grid.png", class_names=class_names)
    row, details = results.fill(cfg, spec, nets, drawn, device)
    if nets.judges or row["request"] is not None:  # an attribute request is judged by measurement, with no network
        results.write_metrics(run_dir / "metrics.json", row, details)
    print(
        f"{'kept the finished' if drawn.kept else 'wrote'} {run_dir / 'samples.npz'} and wrote {run_dir / 'grid.png'}"
        f" ({len(drawn.labels)} samples, {drawn.seconds:.1f} s)" + results.summary(row)
    )
    return row


if __name__ == "__main__":
    main(
        Path(__file__).parent / "configs",
        "sample",
        sample,
        check=check,
        protect="samples",
        aliases={"eval": "eval.enabled"},
    )
