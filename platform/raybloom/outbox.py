"""What a training keeps on this machine when its MLflow server stops answering mid-run (past the
client's own retries, `errors.TrackingLost`), so that nothing is lost and `raybloom run SPEC --resume
RUN_ID` goes on once the server answers again.

One folder per run under `$RAYBLOOM_OUTBOX` (default `.raybloom/outbox`): `outbox.json` (the run, the spec,
the reason, where the training goes on from) and, for a training in this process, `state.pt` (its full
state after its last epoch: weights, optimizer, early stopping, RNGs, and the history of every epoch, the
ones the run does not hold yet included). A Ray training keeps its state in Ray's checkpoints (they hold
the same history); the folder then names where they are. Written atomically (a temporary folder renamed
into place); removed once a resume has written everything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from raybloom.errors import TrackingLost, UserError
from raybloom.spec import JobSpec

ENV = "RAYBLOOM_OUTBOX"
INFO, STATE = "outbox.json", "state.pt"


def root() -> Path:
    return Path(os.environ.get(ENV, ".raybloom/outbox")).resolve()


@dataclass(frozen=True)
class Kept:
    run_id: str
    folder: Path
    spec_json: str
    reason: str
    where: str  # "process" (state.pt) or "ray" (Ray's checkpoints under `checkpoints`)
    checkpoints: Optional[str] = None

    def state(self) -> dict[str, Any]:
        return torch.load(self.folder / STATE, weights_only=True)


def keep(run_id: str, spec: JobSpec, reason: str, state: Optional[dict[str, Any]] = None,
         checkpoints: Optional[str] = None) -> Path:
    """Keep a run's state (`state`: a Training's, in process) or the place of its Ray checkpoints."""
    folder = root() / run_id
    tmp = folder.with_name(f".{run_id}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if state is not None:
        torch.save(state, tmp / STATE)
    info = {"run_id": run_id, "spec": spec.model_dump_json(), "reason": reason, "kept_at": time.time(),
            "where": "process" if state is not None else "ray", "checkpoints": checkpoints}
    (tmp / INFO).write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _read(folder: Path) -> Kept:
    info = json.loads((folder / INFO).read_text())
    return Kept(info["run_id"], folder, info["spec"], info["reason"], info["where"], info.get("checkpoints"))


def find(spec: JobSpec, which: str) -> Kept:
    """The kept run `--resume` goes on in: `which` a run id, or "latest" (the newest kept for this spec)."""
    mine = spec.model_dump_json()
    if which != "latest":
        folder = root() / which
        if not (folder / INFO).is_file():
            raise UserError(f"--resume {which}: nothing kept for that run in {root()} (a training resumes after an "
                            "MLflow outage stopped it; federated runs resume from their MLflow checkpoints)")
        kept = _read(folder)
        if kept.spec_json != mine:
            raise UserError(f"--resume {which}: that run was started from another spec (or other overrides); "
                            "resume it with the same spec and overrides")
        return kept
    infos = root().glob(f"*/{INFO}") if root().is_dir() else []
    found = [_read(f.parent) for f in infos if not f.parent.name.startswith(".")]  # not a keep's temporary folder
    found = [k for k in found if k.spec_json == mine]
    if not found:
        raise UserError(f"--resume: no training of this spec (same file and overrides) is kept in {root()}; "
                        "run it without --resume, or name a run: --resume RUN_ID")
    return max(found, key=lambda k: (k.folder / INFO).stat().st_mtime)


def drop(kept: Kept) -> None:
    shutil.rmtree(kept.folder, ignore_errors=True)


RUN_COMMAND = "raybloom run SPEC [KEY=VALUE]..."  # the CLI puts the command that ran in its place


def lost(error: Exception, run_id: str, folder: Path, what: str) -> TrackingLost:
    """The error a stopped run raises: the server's silence, what was kept where, and the command that goes on."""
    return TrackingLost(f"{error}. Nothing is lost: {what}, kept in {folder}. When the server answers again, go on "
                        f"(each epoch recorded once): {RUN_COMMAND} --resume {run_id}", run_id)
