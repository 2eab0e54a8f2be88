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
