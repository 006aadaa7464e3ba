"""Training jobs: records in the shared store, a per-replica FIFO queue, a child process per job.

A job is a directory `jobs/<id>/` of the shared store, laid out as convserve.contracts.job_dir
says. Any replica sharing the store can answer GetJob/WatchJob/ListJobs for any job by reading
it. A final state is appended to events.jsonl *before* the record turns final, so a watcher that
sees a final record and then reads the file to its end has seen every event.

Each replica runs one job at a time (`python -m convserve.training`, in its own process group so
a cancel ends everything it started), FIFO over the jobs it accepted; the queue itself lives in
memory and the owner heartbeats its queued and running records. A job whose replica died is
noticed by its stale heartbeat (or, on the same host, by the replica's pid being gone) and its
real outcome recorded by `recover`.

In parts, each on top of the one before: params (a request: its TrainConfig and gate
overrides), state (settings and shared state), records (job.json and events), recovery (jobs of
dead replicas), child (spec.json and one training process), runner (the API and the worker
loop). torch-free: the serving process imports this; only the child imports torch.
"""

from convserve.jobs.params import TrainParams
from convserve.jobs.records import JobRecord
from convserve.jobs.runner import JobRunner
from convserve.jobs.state import RunnerConfig

__all__ = ["JobRecord", "JobRunner", "RunnerConfig", "TrainParams"]
