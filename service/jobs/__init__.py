"""Training jobs: records and a FIFO queue in the shared store, a child process per job.

A job is a directory `jobs/<id>/` of the shared store, laid out as convserve.contracts.job_dir
says. Any replica sharing the store queues a Train, and answers GetJob/WatchJob/ListJobs/
CancelJob for any job by reading (and, under the job's lock, writing) it. A final state is
appended to events.jsonl *before* the record turns final, so a watcher that sees a final record
and then reads the file to its end has seen every event.

Queued jobs wait in the store's `queue/` folder (convserve.jobs.queue). A replica with the train
role claims the oldest under the job's lock (exactly one trainer wins), runs it
(`python -m convserve.training`, in its own process group so a cancel ends everything it
started) and heartbeats it. A job whose trainer died is noticed by its stale heartbeat (or, on
the same host, by the trainer's pid being gone) and put back in the queue by `recover`, to
resume from its checkpoint on another trainer, up to `max_attempts` such runs.

In parts, each on top of the one before: params (a request: its TrainConfig and gate
overrides), queue (the queue folder), state (settings and shared state), records (job.json and
events), recovery (jobs of dead trainers), child (spec.json and one training process), runner
(the API, the claim and the worker loop). torch-free: the serving process imports this; only the
child imports torch.
"""

from convserve.jobs.params import TrainParams
from convserve.jobs.records import JobRecord
from convserve.jobs.runner import JobRunner
from convserve.jobs.state import RunnerConfig

__all__ = ["JobRecord", "JobRunner", "RunnerConfig", "TrainParams"]
