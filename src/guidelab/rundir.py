"""One run per run dir: a run holds its dir for its whole life, and a second run started into the same dir is refused.

The hold is an exclusive `fcntl.flock` on RUN/.guidelab.lock, taken without waiting. The kernel drops it when the
holding process ends in any way (an exception, SIGTERM, SIGKILL, a lost node's lease on a network filesystem), so a
lock file left behind by a dead run is not held and the next run (a requeued job, a rerun with resume=true) takes it
over: there is no stale lock to detect by hand. The file records the holder (pid, host, start time, command) so that
a refused run can name it.

A job of several processes (torchrun, a SLURM step, submitit's local tasks: WORLD_SIZE > 1) holds its dir through
rank 0; the other ranks join it. The rule, for a rank > 0, checked before Hydra writes anything:
- rank 0 takes the lock as any run does, records the job it belongs to (`job_id`: torchrun's run id, the scheduler's
  job and step ids, the master's address and port) and then takes a shared flock on RUN/.guidelab.live, which it keeps
  as long as the lock (the lock file itself is never touched by anyone but a would-be holder);
- a rank > 0 probes .guidelab.live with a non-blocking exclusive flock, released at once: free means no run holds
  the dir yet (its rank 0 has not come that far: wait, for at most JOIN_TIMEOUT_S); taken means the holder's record
  is complete (it is written before the shared flock is taken), so the record decides (`rank_decision`): this job's
  rank 0 -> go on; another run, seen on two polls in a row -> stop in one line, as its rank 0 stops. A probe that
  meets a holder taking its shared flock only delays that holder (it blocks for the probe's microseconds); it never
  refuses it.
A filesystem without file locks (flock failing with ENOLCK or EOPNOTSUPP: Lustre without `-o flock`, CIFS, some NFS
mounts) is refused in one line: another hydra.run.dir is the fix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from guidelab.errors import GuidelabError

LOCK_NAME = ".guidelab.lock"
LIVE_NAME = ".guidelab.live"  # shared-flocked by the holder for its life: what the other ranks of its job probe
JOB_VARIABLES = (  # set alike in every rank of a job (torchrun, SLURM, submitit's local executor)
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SUBMITIT_LOCAL_JOB_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
)
JOIN_TIMEOUT_S = 600.0  # how long a rank > 0 waits for its rank 0 to hold the dir (dist.setup's collective timeout)
POLL_S = 0.1
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_held: dict[Path, tuple[int, ...]] = {}  # run dir (resolved) -> the descriptors that hold it, for this process's life


def job_id(environ=os.environ) -> str | None:
    """What names this process's job among the jobs that run now (None for a world of one): the variables that every
    rank of one torchrun / SLURM / submitit job shares and two jobs running at once do not (torchrun's run id is a
    fresh uuid under --standalone; a master's address and port belong to one job while it runs)."""
    if int(environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return " ".join(f"{name}={environ[name]}" for name in JOB_VARIABLES if name in environ)


def rank_decision(held: bool, record: dict, job: str) -> str:
    """What a rank > 0 of `job` does about a run dir: "join" (its rank 0 holds it), "stop" (another run holds it: its
    rank 0 is refused) or "wait" (no run holds it yet). `held`: .guidelab.live is flocked; `record`: the lock file's
    holder record, complete whenever `held`."""
    if not held:
        return "wait"
    return "join" if record.get("job") == job else "stop"


def holder(run_dir: str | Path) -> dict:
    """The recorded holder of a run dir's lock ({} if none was recorded or the file is unreadable)."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return {}


def probe(run_dir: str | Path, key: str = "hydra.run.dir") -> None:
    """Create the run dir (and its missing parents) and a file in it, then remove what this created: a place that
    cannot hold a run (a path through a file, no permission, a read-only or pseudo filesystem such as /proc, a name
    too long) is refused now, in one line, and not by a traceback from the first write. Rank 0 alone probes."""
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 probes for the job; a rank's removal would race another's
        return
    path, missing, created = Path(run_dir), [], []
    try:
        while not path.exists() and path != path.parent:  # exists() itself refuses a name too long
            missing.append(path)
            path = path.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        probe_file = Path(run_dir) / f".guidelab-probe-{os.getpid()}"
        probe_file.touch()
        probe_file.unlink()
    except OSError as e:
        raise GuidelabError(
            f"cannot create the run dir {run_dir}: {e.strerror or e} ({e.filename or path}); choose another {key}"
        ) from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:  # another process wrote into it meanwhile: it is theirs now
                break


def _flock(fd: int, how: int, path: Path) -> None:
    """fcntl.flock, with a filesystem that has no locks refused in one line (BlockingIOError passes through)."""
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        os.close(fd)
        raise GuidelabError(
            f"{path.parent} is on a filesystem without file locks (flock: {e.strerror}; e.g. Lustre mounted without "
            "-o flock, CIFS, some NFS mounts), and guidelab holds each run dir with a lock; choose a hydra.run.dir on "
            "a filesystem with locks (a local disk, or a mount with locking enabled)"
        ) from None


def _in_use(run_dir, h: dict) -> GuidelabError:
    who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}: {h.get('command', '?')}"
    return GuidelabError(
        f"{run_dir} is in use by another guidelab run ({who}); wait for it to end or stop it, or choose another "
        "hydra.run.dir"
    )


def hold(run_dir: str | Path) -> None:
    """Take the run dir for this process (creating the dir), or refuse in one line naming the run that holds it; a
    rank > 0 joins its rank 0 instead (`join`). Idempotent within a process; released when the process ends (or by
    `release`)."""
    path = Path(run_dir).resolve()
    if path in _held:
        return
    if int(os.environ.get("RANK", "0")) != 0:
        join(run_dir)
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path / LOCK_NAME)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(run_dir, holder(path)) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "job": job_id(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    live = os.open(path / LIVE_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    _flock(live, fcntl.LOCK_SH, path / LIVE_NAME)  # after the record: whoever sees it taken reads a complete record
    _held[path] = (live, fd)


def _live(path: Path) -> bool:
    """Whether a run holds the dir now (its shared flock on .guidelab.live), by a probe released at once."""
    try:
        fd = os.open(path / LIVE_NAME, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path / LIVE_NAME)
    except BlockingIOError:
        os.close(fd)
        return True
    os.close(fd)  # closing drops the probe's flock
    return False


def join(run_dir: str | Path) -> None:
    """A rank > 0: go on once its own job's rank 0 holds the run dir; stop in one line if another run holds it, or if
    rank 0 has not taken it within JOIN_TIMEOUT_S (the rule is in the module docstring)."""
    path, job, seen = Path(run_dir).resolve(), job_id(), None
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while True:
        held = _live(path)
        record = holder(path)  # read after the probe: the holder seen, or one that took the dir over since
        decision = rank_decision(held, record, job)
        if decision == "join":
            _held[path] = ()
            return
        if decision == "stop" and record == seen:  # seen twice, a poll apart: not a holder handing the dir over
            raise _in_use(run_dir, record)
        seen = record if decision == "stop" else None
        if time.monotonic() > deadline:
            raise GuidelabError(
                f"rank {os.environ.get('RANK')} waited {JOIN_TIMEOUT_S:.0f} s for rank 0 of its job to hold {run_dir}; "
                "see rank 0's output for why it did not start"
            )
        time.sleep(POLL_S)


def refuse_held(run_dir: str | Path) -> None:
    """Refuse in one line naming the holder if another process holds the run dir now, taking nothing: what the dir
    holds (shards, samples.npz, checkpoints) is then that run's work in progress, not a finished or killed run's. The
    test takes a shared flock for an instant (a run starting at that very instant may be refused as if held)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file() or Path(run_dir).resolve() in _held or int(os.environ.get("RANK", "0")) != 0:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, path)
    except BlockingIOError:
        raise _in_use(run_dir, holder(run_dir)) from None
    finally:
        os.close(fd)


def release(run_dir: str | Path) -> None:
    """Give the run dir back before the process ends (a sweep's job is done; the next job holds its own dir)."""
    for fd in _held.pop(Path(run_dir).resolve(), ()):  # .guidelab.live first: a later holder's record is complete
        os.close(fd)  # closing the descriptor drops the flock; the file stays, recording the last holder
