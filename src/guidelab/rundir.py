"""One run per run dir: a run holds its dir for its whole life, and a second run started into the same dir is refused.

The hold is an exclusive `fcntl.flock` on RUN/.guidelab.lock, taken without waiting. The kernel drops it when the
holding process ends in any way (an exception, SIGTERM, SIGKILL, a lost node's lease on a network filesystem), so a
lock file left behind by a dead run is not held and the next run (a requeued job, a rerun with resume=true) takes it
over: there is no stale lock to detect by hand. The file records the holder (pid, host, start time, command) so that
a refused run can name it. Under torchrun only rank 0 holds the dir: the ranks of one job share it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from guidelab.errors import GuidelabError

LOCK_NAME = ".guidelab.lock"
_held: dict[Path, int] = {}  # run dir (resolved) -> the open descriptor that holds it, for this process's life


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


def hold(run_dir: str | Path) -> None:
    """Take the run dir for this process (creating the dir), or refuse in one line naming the run that holds it.
    Idempotent within a process; released when the process ends (or by `release`)."""
    path = Path(run_dir).resolve()
    if path in _held or int(os.environ.get("RANK", "0")) != 0:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _in_use(run_dir) from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[path] = fd


def _in_use(run_dir: str | Path) -> GuidelabError:
    """The one-line refusal of a run dir that another process holds, naming the holder."""
    h = holder(run_dir)
    who = f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}: {h.get('command', '?')}"
    return GuidelabError(
        f"{run_dir} is in use by another guidelab run ({who}); wait for it to end or stop it, or choose another "
        "hydra.run.dir"
    )


def refuse_held(run_dir: str | Path) -> None:
    """Refuse in one line naming the holder if another process holds the run dir now, taking nothing: what the dir
    holds (shards, samples.npz, checkpoints) is then that run's work in progress, not a finished or killed run's. The
    test takes a shared flock for an instant (a run starting at that very instant may be refused as if held)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file() or Path(run_dir).resolve() in _held or int(os.environ.get("RANK", "0")) != 0:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(run_dir) from None
    finally:
        os.close(fd)


def release(run_dir: str | Path) -> None:
    """Give the run dir back before the process ends (a sweep's job is done; the next job holds its own dir)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock; the file stays, recording the last holder
