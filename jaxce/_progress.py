"""A progress display on stderr for the command line, shown only on a terminal.

tqdm draws it when installed (the ``cli`` extra); without tqdm it is one plain line,
rewritten in place. Either way nothing is written when the stream is not a terminal, so
logs, pipes and ``--json`` output stay clean.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO


class Progress:
    """``with Progress(total, "verify") as progress: ... progress.advance("softmax float32")``."""

    def __init__(self, total: int, description: str, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.description = description
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self._bar = self._tqdm() if self.enabled else None

    def _tqdm(self) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total, desc=self.description, file=self.stream, leave=False)

    def advance(self, label: str = "") -> None:
        """Counts one step done; ``label`` says what it was."""
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update()
        elif self.enabled:
            line = f"{self.description} [{self.done}/{self.total}] {label}"
            self.stream.write("\r" + line[:119].ljust(119))
            self.stream.flush()

    def set_total(self, total: int) -> None:
        """Changes the number of steps (once it is known)."""
        self.total = total
        if self._bar is not None and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
