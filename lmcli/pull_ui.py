"""Rich progress for `lmcli pull` on a terminal (a UI module): per file bytes, rate and ETA; per shard, tensors."""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.text import Text


class _Amount(ProgressColumn):
    """Bytes for a download, pieces for a conversion."""

    _bytes = DownloadColumn()

    def render(self, task) -> Text:
        unit = task.fields.get("unit")
        if unit != "bytes":
            return Text(f"{int(task.completed)}/{int(task.total or 0)} {unit}", style="progress.download")
        return self._bytes.render(task)


class _Rate(ProgressColumn):
    _speed = TransferSpeedColumn()

    def render(self, task) -> Text:
        return self._speed.render(task) if task.fields.get("unit") == "bytes" else Text("")


class PullProgress:
    """On stderr: the pull's shards done, and a line for the file downloading or the shard converting now."""

    def __init__(self):
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), _Amount(), _Rate(),
                           TimeRemainingColumn(), console=Console(stderr=True))
        self._p.start()

    def bar_class(self, label: str) -> type:
        """A class huggingface_hub drives as its tqdm_class while it downloads `label`."""
        p = self._p

        class _Bar:
            def __init__(self, *args, total=None, initial=0, **kwargs):
                self._task = p.add_task(f"downloading {label}", total=total, completed=initial, unit="bytes")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.close()
                return False

            def update(self, n: int = 1) -> None:
                p.advance(self._task, n)

            def close(self) -> None:
                if self._task is not None:
                    p.remove_task(self._task)
                    self._task = None

        return _Bar

    def converting(self, label: str, total: int) -> Callable[[int, int], None]:
        if total == 0:
            return lambda done, _total: None
        task = self._p.add_task(label, total=total, unit="tensors")

        def update(done: int, _total: int) -> None:
            self._p.update(task, completed=done)
            if done >= total:
                self._p.remove_task(task)

        return update

    def overall(self, label: str, total: int) -> Callable[[int], None]:
        task = self._p.add_task(label, total=total, unit="shards")
        return lambda done: self._p.update(task, completed=done)

    def note(self, text: str) -> None:
        self._p.console.print(text)

    def close(self) -> None:
        self._p.stop()
