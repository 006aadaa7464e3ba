"""Errors of a training run that the CLI reports in one line; torch-free so that reporting a bad
argument never waits for torch to import."""


class ExportError(RuntimeError):
    """The export failed, or the exported file does not match the torch model."""


class ResumeError(RuntimeError):
    """A checkpoint that cannot continue this run (missing, or made with another config)."""
