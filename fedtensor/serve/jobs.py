"""Web compression jobs: a per-session temp area, one background worker, expiry and clean-up.

Layout: ``root/<session id>/<job id>/`` holds a job's upload and outputs (see
:mod:`fedtensor.serve.pipeline`). Both ids are random hex tokens made here; nothing the client names
becomes a path. Jobs run one at a time on a single worker thread (compression is CPU-bound and JAX
already uses every core); a job first compresses (the result page shows it as soon as that is done),
then codes the rival codecs for the size chart. A job not looked at for ``ttl_s`` is deleted with its
files, a session keeps at most ``max_jobs`` (the oldest go first), and :meth:`JobManager.close`
removes the whole area (also run at interpreter exit).
"""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedtensor.errors import FedtensorError

_TOKEN = re.compile(r"^[0-9a-f]{32}$")


def new_token() -> str:
    return secrets.token_hex(16)


def valid_token(s: str | None) -> bool:
    return isinstance(s, str) and bool(_TOKEN.match(s))


class JobLimitError(FedtensorError):
    """Too many jobs waiting for this session."""


@dataclass
class Job:
    id: str
    sid: str
    name: str
    dir: Path
    settings: object
    modality: str
    window: dict
    model_version: int | None = None
    state: str = "queued"  # queued → running → done | failed
    stage: str = "waiting for the worker"
    result: dict | None = None
    error: str | None = None
    compare_state: str = "pending"  # pending → running → done | failed | off
    compare_stage: str = ""
    compare_rows: list = field(default_factory=list)
    created: float = field(default_factory=time.time)
    touched: float = field(default_factory=time.time)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)  # deleted, or shutdown
    volume: object = field(default=None, repr=False)  # dropped once the job has finished

    def check(self) -> None:
        """Between stages: stop here if the job was deleted or the server is stopping (the worker is
        single: a deleted job must not hold every other user's job behind its rival-codec search)."""
        if self.cancelled.is_set():
            raise JobCancelled

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "stage": self.stage, "error": self.error,
                "compare_state": self.compare_state, "compare_stage": self.compare_stage}


def _one_line(e: BaseException) -> str:
    """A user-facing line for an unexpected failure (no traceback, no paths)."""
    if isinstance(e, FedtensorError):
        return str(e)
    if isinstance(e, MemoryError):
        return "not enough memory for this volume"
    return f"internal error while processing the volume ({type(e).__name__})"


class JobCancelled(Exception):
    """Raised at a job's next stage once it was deleted or the server is stopping (see :meth:`Job.check`)."""


class JobManager:
    """Jobs by (session, id), their directories under ``root`` (a new temp directory, in ``parent`` if
    given), and the worker that runs them."""

    def __init__(self, parent: Path | None = None, *, ttl_s: float = 3600.0, max_jobs: int = 6,
                 max_waiting: int = 2, max_queued_total: int = 8, compare: bool = True):
        # always a fresh directory of our own (inside ``parent`` if given): close() removes it whole
        try:
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))
            (self.root / _OWNER).write_text(str(os.getpid()))
        except OSError as e:
            raise FedtensorError(f"cannot create the web temp area in {parent or tempfile.gettempdir()}: "
                                 f"{e.strerror or e}") from None
        self.ttl_s, self.max_jobs, self.max_waiting, self.compare = ttl_s, max_jobs, max_waiting, compare
        # per-session limits alone are void against a client that drops its cookie: cap the whole queue too
        self.max_queued_total = max_queued_total
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedtensor-web")
        self._last_sweep = 0.0
        self._closed = False
        atexit.register(_close_ref, weakref.ref(self))
        _remove_orphans(self.root.parent, keep=self.root)

    # -- access --------------------------------------------------------------------------------
    def new_dir(self, sid: str) -> tuple[str, Path]:
        """A fresh job id and its (created) directory in the session's area."""
        if not valid_token(sid):
            raise ValueError("bad session id")
        jid = new_token()
        d = self.root / sid / jid
        d.mkdir(parents=True)
        return jid, d

    def get(self, sid: str, jid: str) -> Job | None:
        """The session's job (refreshing its expiry), or ``None``: other sessions' jobs do not exist."""
        if not (valid_token(sid) and valid_token(jid)):
            return None
        with self._lock:
            job = self._jobs.get(jid)
            if job is None or job.sid != sid:
                return None
            job.touched = time.time()
            return job

    def list(self, sid: str) -> list[Job]:
        with self._lock:
            return sorted((j for j in self._jobs.values() if j.sid == sid), key=lambda j: -j.created)

    # -- running -------------------------------------------------------------------------------
    def submit(self, job: Job, work: Callable[[Job], dict], compare: Callable[[Job], list] | None) -> Job:
        """Queue ``work(job)`` (then ``compare(job)``) on the worker; enforce the per-session limits."""
        with self._lock:
            mine = [j for j in self._jobs.values() if j.sid == job.sid]
            if sum(j.state in ("queued", "running") for j in mine) >= self.max_waiting:
                shutil.rmtree(job.dir, ignore_errors=True)
                raise JobLimitError("you already have jobs waiting; wait for them to finish")
            if sum(j.state in ("queued", "running") for j in self._jobs.values()) >= self.max_queued_total:
                shutil.rmtree(job.dir, ignore_errors=True)
                raise JobLimitError("the server is busy with other jobs; try again in a minute")
            self._jobs[job.id] = job
            old = sorted((j for j in mine if j.finished.is_set()), key=lambda j: j.created)
            drop = old[: max(0, len(mine) + 1 - self.max_jobs)]
        for j in drop:
            self.delete(j.sid, j.id)
        if compare is None or not self.compare:
            job.compare_state = "off"
        self._pool.submit(self._run, job, work, compare)
        return job

    def _run(self, job: Job, work, compare) -> None:
        try:
            if job.id not in self._jobs:  # deleted while queued
                return
            job.state = "running"
            try:
                job.result = work(job)
                job.state, job.stage = "done", "done"
            except JobCancelled:
                job.state, job.error, job.compare_state = "failed", "cancelled", "off"
                return
            except Exception as e:  # noqa: BLE001 - reported on the page, never as a traceback
                job.state, job.error, job.compare_state = "failed", _one_line(e), "off"
                return
            if job.compare_state == "off":
                return
            job.compare_state = "running"
            try:
                job.compare_rows = compare(job)
                job.compare_state = "done"
            except JobCancelled:
                job.compare_state = "off"
            except Exception as e:  # noqa: BLE001
                job.compare_state, job.compare_stage = "failed", _one_line(e)
        finally:
            job.volume = None
            with self._lock:  # against delete(): one of the two removes the files, before "finished"
                if job.id not in self._jobs:  # deleted while it ran
                    shutil.rmtree(job.dir, ignore_errors=True)
                job.finished.set()

    # -- clean-up ------------------------------------------------------------------------------
    def delete(self, sid: str, jid: str) -> bool:
        with self._lock:
            job = self._jobs.get(jid)
            if job is None or job.sid != sid:
                return False
            del self._jobs[jid]
            finished = job.finished.is_set()
        job.cancelled.set()
        if finished:
            shutil.rmtree(job.dir, ignore_errors=True)
        return True  # a running job's files go when it finishes

    def sweep(self, now: float | None = None, *, every_s: float = 30.0) -> int:
        """Delete finished jobs idle for more than ``ttl_s`` (at most once per ``every_s``)."""
        now = time.time() if now is None else now
        if now - self._last_sweep < every_s:
            return 0
        self._last_sweep = now
        with self._lock:
            stale = [j for j in self._jobs.values() if j.finished.is_set() and now - j.touched > self.ttl_s]
        for j in stale:
            self.delete(j.sid, j.id)
        for d in self.root.iterdir() if self.root.exists() else ():  # empty session areas
            try:
                d.rmdir()
            except OSError:
                pass
        return len(stale)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for job in self._jobs.values():  # a running job stops at its next stage: exit is not held up
                job.cancelled.set()
            self._jobs.clear()
        shutil.rmtree(self.root, ignore_errors=True)


_PREFIX, _OWNER = "fedtensor-web-", ".owner-pid"


def _remove_orphans(parent: Path, keep: Path) -> None:
    """Remove the temp areas of servers that died without closing them (killed, power lost): ours by
    owner, named like ours, holding the pid of a process that no longer runs."""
    for d in parent.glob(_PREFIX + "*"):
        try:
            if d == keep or d.stat().st_uid != os.getuid():
                continue
            pid = int((d / _OWNER).read_text())
            os.kill(pid, 0)  # raises ProcessLookupError when no such process runs
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):  # not ours to judge (another user's process, no marker, ...)
            continue


def _close_ref(ref) -> None:
    m = ref()
    if m is not None:
        m.close()
