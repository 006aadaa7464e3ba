"""Training jobs: accepted by any replica, queued in a job store, run by trainers.

The job store (convserve.jobs.backend) is one interface with two backends: files in the model
store's directory (the default: one machine, or a shared volume) and PostgreSQL
(`--jobs-url postgresql://…`: replicas on many machines). The runner is built over it by
composition:

    runner      JobRunner: the API the servicers call (submit, get, list, cancel, watch, resume)
    trainer     a train-role replica's loop: claim the oldest queued job, run it, repeat
    child       one job's training process (`python -m convserve.training --job DIR`):
                start, heartbeat (the lease), copy its events, stop, record how it ended
    recovery    jobs whose trainer died: back to the queue (bounded attempts), or their outcome
    transitions the state changes those parts share (finish, requeue, adopt a publication)
    records     JobRecord, the value every store keeps; params: a request's settings
    files, postgres, schema, queue   the backends (and PostgreSQL's migrations)

torch-free: the serving process imports this; only the child imports torch.
"""

from convserve.jobs.backend import JobStore, open_job_store
from convserve.jobs.config import RunnerConfig
from convserve.jobs.params import TrainParams
from convserve.jobs.records import JobRecord
from convserve.jobs.runner import JobRunner

__all__ = ["JobRecord", "JobRunner", "JobStore", "RunnerConfig", "TrainParams", "open_job_store"]
