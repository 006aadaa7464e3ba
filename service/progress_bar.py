"""The one-line progress bar a terminal shows for a training run: drawn by the training CLI and by
`convserve train --watch` (standard library only, so the client draws it without the pipeline).
"""

from __future__ import annotations


def render_bar(step: int, steps: int, epoch: int, epochs: int, images_per_s: float,
               eta_s: float | None, width: int = 30) -> str:
    filled = int(width * step / steps) if steps else width
    eta = "--:--" if eta_s is None else _clock(eta_s)
    return (f"[{'#' * filled}{'.' * (width - filled)}] epoch {epoch}/{epochs} "
            f"step {step}/{steps} {images_per_s:,.0f} img/s ETA {eta}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
