"""Moving a model store between backends: `convserve models copy SRC DST` (a directory to object
storage and back). Versions keep their numbers, cards their bytes' meaning (and the sha256 that is
checked on both sides), history its entries in order, and the pointer its version.
"""

from __future__ import annotations

from dataclasses import dataclass

from convserve.contracts.errors import StoreError
from convserve.store.base import RECOVERY_ACTOR, HistoryEntry, ModelStore, utc_now


@dataclass(frozen=True)
class CopyReport:
    versions: list[int]
    history: int            # entries written
    promoted: int | None


def copy_store(source: ModelStore, destination: ModelStore) -> CopyReport:
    """Copy every version (checked against its card on the way), then the history and pointer.
    The destination must be empty: copying never merges two stores' numbers."""
    if destination.versions() or destination.history() or destination.promoted_version():
        raise StoreError(f"{destination.url} is not empty: copy into a new directory, bucket "
                         "or prefix")
    versions = source.versions()
    for version in versions:
        opened = source.open_version(version)  # downloaded and checked against its card
        destination.import_version(version, opened.path, dict(opened.card.raw))
    entries = source.history()
    promoted = source.promoted_version()
    last = entries[-1].version if entries else None
    if promoted is not None and promoted != last:  # a promoter died before writing history
        entries.append(HistoryEntry(promoted, last, "copied: the pointer was ahead of history",
                                    utc_now(), RECOVERY_ACTOR))
    if entries:
        destination.import_history(entries)
    return CopyReport(versions, len(entries), promoted)
