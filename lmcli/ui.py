"""Terminal UI pieces (Rich): progress for long operations. Only UI modules import Rich."""

from __future__ import annotations


class _Bar:
    def __init__(self, label: str):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TextColumn("{task.fields[tensors]}"), TimeRemainingColumn(), transient=True)
        self._p.start()
        self._task = self._p.add_task(label, total=None, tensors="")

    def update(self, done_tensors: int, total_tensors: int, done_bytes: int, total_bytes: int) -> None:
        self._p.update(self._task, completed=done_bytes, total=total_bytes,
                       tensors=f"{done_tensors}/{total_tensors} tensors")

    def close(self) -> None:
        self._p.stop()


def progress_bar(label: str) -> _Bar:
    """A transient progress bar on stderr (callers only create it when stderr is a terminal)."""
    return _Bar(label)
