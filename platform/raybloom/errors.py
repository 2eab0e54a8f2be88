"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""

import threading


class UserError(Exception):
    """Bad input: a spec, a data file, an override. The message names what is wrong and what is accepted."""


class SpecError(UserError):
    """The job spec (file or override) is invalid."""


class DataError(UserError):
    """A dataset is missing, corrupt or has the wrong schema. The message names the file or column."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the run is recorded as FAILED with this message as its reason."""

    def __init__(self, message: str, epoch: int = -1):
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self):  # crosses process boundaries (Ray workers) with its epoch
        return (type(self), (str(self), self.epoch))


class TrackingLost(UserError):
    """The MLflow tracking server stopped answering mid-run, past its client's own retries. What the run has
    not written yet is kept on this machine (`raybloom.outbox`: the training's state, or where Ray keeps
    its checkpoints); `raybloom run SPEC --resume RUN_ID` goes on from there once the server answers, and
    writes each epoch once. The CLI exits with EXIT_CODE (EX_TEMPFAIL: try again later)."""

    EXIT_CODE = 75

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id

    def __reduce__(self):  # crosses process boundaries (Ray workers) with its run id
        return (type(self), (str(self), self.run_id))


class _Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, held back while the main thread writes to the tracking store:
    an interrupt in the middle of a SQLite transaction left its write lock held, and the KILLED status written
    next waited on it for ever. Held back, it is raised as the write returns; a second one is raised at once."""

    depth = 0
    pending = False


def interrupt(signum, frame) -> None:
    """The CLI's handler of SIGINT and SIGTERM."""
    if _Interrupts.depth and not _Interrupts.pending:
        _Interrupts.pending = True
        return
    _Interrupts.pending = False
    raise KeyboardInterrupt


class uninterrupted:  # noqa: N801 - used as `with uninterrupted():`
    """A block that an interrupt does not cut in half (in the main thread; signals reach no other): the
    interrupt is raised when the outermost such block ends, in place of an error the block raised."""

    def __enter__(self) -> None:
        self.main = threading.current_thread() is threading.main_thread()  # another thread's write holds nothing back
        _Interrupts.depth += self.main

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.main:
            return False
        _Interrupts.depth -= 1
        if _Interrupts.depth == 0 and _Interrupts.pending:  # raised now or never (a stale one would cut a later write)
            _Interrupts.pending = False
            if exc_type is None or not issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
                raise KeyboardInterrupt from exc
        return False
