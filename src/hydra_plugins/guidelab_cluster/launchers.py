"""SLURM through Hydra's submitit launcher (the optional `cluster` extra: `pip install -e '.[cluster]'`). It lives in
the `hydra_plugins` namespace because Hydra instantiates launchers from there alone.

`hydra/launcher=slurm` (configs/hydra/launcher/slurm.yaml) and `hydra/launcher=local` (the same on this machine, for
trying it out) are hydra-submitit-launcher's launchers with one change: their jobs run with `resume=auto` (unless the
command line sets resume), and a job that is pre-empted or reaches its time limit is requeued with `resume=auto`
whatever it was, so the requeued job continues from what it saved (training: the run dir's newest intact checkpoint;
sampling: its finished batches) instead of being refused for finding results in its own run dir.

The hand-over: SLURM sends the signal (`--signal=USR2@signal_delay_s`, set by submitit) to every task; the training
loop (guidelab.train.StopRequest) finishes the step, saves, and then calls submitit's handler, which on task 0 pickles
`checkpoint()`'s resubmission and runs `scontrol requeue` (the local executor restarts the job itself). Ranks, world
size and the master address of the job's tasks come from SLURM's variables (guidelab.dist.scheduler_env).
"""

from __future__ import annotations

try:  # Hydra imports every hydra_plugins module at start-up: without the cluster extra this one defines nothing
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _Local
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _Slurm
except ImportError:
    _Local = _Slurm = None


def _sets_resume(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") == "resume"


def with_resume(sweep_overrides: list[str]) -> list[str]:
    """A job's overrides as its task runs them: `resume=auto` unless the command line set resume itself. A job that
    SLURM requeues on its own (a pre-emption with PreemptMode=REQUEUE) runs its first submission again: it too must
    continue from what it saved. In a new sweep dir auto starts fresh, as false does."""
    return sweep_overrides if any(map(_sets_resume, sweep_overrides)) else [*sweep_overrides, "resume=auto"]


def requeued(sweep_overrides: list[str]) -> list[str]:
    """A requeued job's overrides: the job's own, with `resume=auto` (replacing any resume= it had)."""
    return [o for o in sweep_overrides if not _sets_resume(o)] + ["resume=auto"]


class _Requeue:
    def __call__(self, sweep_overrides, *args, **kwargs):
        from guidelab import config

        config.register()  # a fresh task process: guidelab's schemas and resolvers, as the entry point registers them
        return super().__call__(with_resume(list(sweep_overrides)), *args, **kwargs)

    def checkpoint(self, sweep_overrides, *args, **kwargs):
        """submitit calls this on task 0 when the job is pre-empted or times out: the resubmission it requeues."""
        return super().checkpoint(requeued(list(sweep_overrides)), *args, **kwargs)


if _Slurm is not None:

    class SlurmLauncher(_Requeue, _Slurm):
        """hydra-submitit-launcher's SLURM launcher whose requeued jobs resume (`requeued`)."""

    class LocalLauncher(_Requeue, _Local):
        """hydra-submitit-launcher's local launcher (processes on this machine) whose requeued jobs resume."""
