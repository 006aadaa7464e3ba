"""The contracts the server, the SDK and the training pipeline share, in the standard library only:

    job_dir         a job's directory, its states (JobState, Phase) and its events
    spec            the training spec (TrainConfig): fields, defaults and ranges
    gate_policy     the promotion gate's settings and how far a request may move them
    model_metadata  what an exported ONNX file says about itself
    commands        the exit-code table and one-line usage errors of every CLI

Nothing here imports the serving side, the training side or a third-party package (import-linter
checks it in `make lint`).
"""
