"""Preemption: SIGTERM, SIGINT and SIGUSR1 ask the trainer to stop after the current optimizer step.

A cluster ends a job with SIGTERM (at the time limit, at preemption, on `scancel`), then SIGKILL after
KillWait (30 s by default on SLURM), and can send one a chosen time ahead: the SLURM profile asks for
`--signal=TERM@300` (docs/slurm.md says why SIGTERM and not `B:USR1` under Snakemake's SLURM executor).
On any of the three the trainer finishes the step it is in, writes a checkpoint at that step, says so in the
log and exits with EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"); the same command resumes from the
checkpoint. Under DDP every rank must stop at the same step: the ranks OR their flags each step (in the
all-reduce of the step's loss), so a signal that reached one rank stops them all.

The handlers can only be installed in a process's main thread (Python's rule). Snakemake runs a `run:` block
in a worker thread, so the `train` rule starts the trainer as a process of its own (model.train.launch).
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped on request, resumable


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; the message says where and how to resume."""


class StopRequest:
    """Remembers the first stop signal received while installed (a context manager); later ones change
    nothing, so a signal sent both to a process group and forwarded by torchrun counts once."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
