"""`raybloom run SPEC --resume [RUN_ID]`: which federated run to go on in, and whether it may be.

Every federated run carries the hash of its spec (`raybloom.spec_sha`) and who drives it
(`raybloom.driver`: host, pid and start time of the driver process, and the boot). `--resume` takes the
newest unfinished run of the same spec in the experiment (or the run named), refuses one that is
FINISHED or whose driver is still alive on this host, and hands it back RUNNING to the driver, whose
ServerApp continues after the run's last checkpoint (`checkpoint`).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from typing import Optional

from raybloom import tracking
from raybloom.errors import UserError
from raybloom.pids import alive, boot_id, read_proc
from raybloom.spec import JobSpec

LATEST = "latest"
SPEC_TAG = "raybloom.spec_sha"
DRIVER_TAG = "raybloom.driver"


def spec_sha(spec: JobSpec) -> str:
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:20]


def driver_tag() -> str:
    me = read_proc(os.getpid())
    return f"{socket.gethostname()}|{os.getpid()}|{me.start if me else 0}|{boot_id()}"


def driver_alive(tag: str) -> Optional[bool]:
    """Is the driver a run's tag names still running? None when it ran on another host (no way to tell)."""
    try:
        host, pid, start, boot = tag.split("|")
    except ValueError:
        return False
    if host != socket.gethostname():
        return None
    return boot == boot_id() and alive(int(pid), int(start))


def _latest(spec: JobSpec) -> tracking.RunRecord:
    sha = spec_sha(spec)
    runs = [r for r in tracking.list_runs(spec.experiment, spec, f"tags.`{SPEC_TAG}` = '{sha}'")
            if r.kind == "federated" and r.status != "FINISHED"]
    if not runs:
        raise UserError(f"--resume: experiment {spec.experiment!r} has no unfinished federated run of this spec "
                        "(same file and overrides); run it without --resume, or name a run: --resume RUN_ID")
    return max(runs, key=lambda r: r.start_time)


def resumable(spec: JobSpec, which: str) -> tracking.RunRecord:
    """The run `--resume` goes on in (`which`: LATEST or a run id), after checking it may."""
    run = _latest(spec) if which == LATEST else tracking.get_run(which, spec)
    if run is None:
        raise UserError(f"--resume {which}: no such run at {tracking.tracking_uri(spec)}")
    if run.kind != "federated":
        raise UserError(f"--resume {run.run_id}: a {run.kind} run; only federated runs resume")
    if run.tags.get(SPEC_TAG) != spec_sha(spec):
        raise UserError(f"--resume {run.run_id}: that run was started from another spec (or other overrides); "
                        "resume it with the same spec and overrides")
    if run.status == "FINISHED":
        raise UserError(f"--resume {run.run_id}: the run already FINISHED; nothing to resume")
    tag = run.tags.get(DRIVER_TAG, "")
    state = driver_alive(tag)
    if state:
        raise UserError(f"--resume {run.run_id}: the run is still running (driver pid {tag.split('|')[1]} on this "
                        "host); wait for it, or stop it (Ctrl-C, kill) and resume then")
    if state is None:
        print(f"--resume {run.run_id}: its driver ran on host {tag.split('|')[0]}; it cannot be checked from here "
              "and is taken to be gone", file=sys.stderr, flush=True)
    return run


def end_dead_run(run_id: str, uri: str) -> None:
    """What the reaper runs once the driver died and its SuperLink is killed: the run, if still RUNNING,
    ends KILLED with the reason and the way back (a dead run is not left RUNNING)."""
    rec = tracking.RunRecorder(run_id, uri)
    if rec.record().status == "RUNNING":
        rec.end("KILLED", "its driver died (killed); `raybloom run SPEC --resume` continues the run "
                          "after its last finished round")


def on_driver_death(run_id: str, uri: str) -> list[str]:
    """The command for `simulation.SimulationLink.on_driver_death`."""
    return [sys.executable, "-m", "raybloom.federated.resume", "--end-dead", run_id, tracking.absolute_uri(uri)]


if __name__ == "__main__":  # python -m raybloom.federated.resume --end-dead RUN_ID URI (the reaper's call)
    if sys.argv[1:2] == ["--end-dead"] and len(sys.argv) == 4:
        end_dead_run(sys.argv[2], sys.argv[3])
