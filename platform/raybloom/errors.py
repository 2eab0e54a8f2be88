"""Errors a user can act on. The CLI prints their message (no traceback) and exits with code 2."""


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
