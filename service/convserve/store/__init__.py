"""The model store: immutable versions, their cards, the promoted pointer, the promotion history
and a job's artifacts, behind one interface with two backends.

    base            the interface (`ModelStore`) and the values it returns
    location        a store's URL: `open_store` opens a directory or `s3://bucket/prefix`
    directory       the directory store (the default; needs no setup)
    s3              the S3-compatible object store (conditional writes, no lock server)
    cache           the bounded local copy of downloaded versions, checked by sha256
    work_dir        the local working directory: job directories and the files job queue
    job_dir         a job's directory: its files and events (one owner of that format)
    job_spec        spec.json: what a job's training process runs
    durable_files   atomic, fsync'd writes and file locks

Standard library only at import, except `s3` (boto3): the training child, the server and the CLI
import this package, and only a store that names `s3://` loads boto3.
"""
