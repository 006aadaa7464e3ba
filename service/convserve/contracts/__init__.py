"""The contracts the server, the SDK and the training pipeline share, in the standard library only:

    spec            the training spec (TrainConfig): fields, defaults, ranges and help
    job_spec        spec.json: what a job's training process runs
    job_dir         a job's directory, its states (JobState, Phase) and its events
    gate_policy     the promotion gate's settings and how far a request may move them
    model_card      the typed model card and gate decision
    model_signature the model's input and output (name, dtype, layout, size): one SIGNATURE
    model_metadata  what an exported ONNX file says about itself
    store           the model store (a directory): versions, the promoted pointer, history
    durable_files   atomic, fsync'd writes and file locks
    errors          the error hierarchy every part raises
    headers         the request-id and auth metadata names
    commands        the exit-code table and one-line usage errors of every CLI

Nothing here imports the serving side, the training side or a third-party package (import-linter
checks it in `make lint`).
"""
