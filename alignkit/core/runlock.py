"""One live run per run folder: an exclusive ``flock`` on ``runs/<recipe>/.lock``.

Two runs in one folder corrupt each other: the second one's stale-config clean-up deletes the first one's
stage folder, resumes its fresh checkpoint and writes a ``done`` manifest for weights it did not train. So
``alignkit run`` takes the lock before it writes anything, and a second run is refused at once, naming the
holder. The kernel drops a ``flock`` when its holder dies (kill -9 and crashes included), so a lock is never
stale and never needs removing by hand. Under ``accelerate launch`` only the main process takes it; the other
ranks of that launch work under it (see :func:`alignkit.run.pipeline.run_recipe`).

The file is never deleted (unlinking a lock file lets two processes lock two different files); its content,
the holder's pid, host and command line (secrets masked), is only for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from alignkit.core.errors import AlignkitError, RunFolderBusy
from alignkit.core.secrets import redact_text

LOCK_FILE = ".lock"


class RunLock:
    """``acquire()`` holds ``root/.lock`` or raises :class:`RunFolderBusy` at once; ``release()`` (or the
    holder's exit, however it dies) frees it. Also a context manager."""

    def __init__(self, root: Path, option: str = "--output-dir"):
        self.root, self.option = Path(root), option  # option: the command-line flag that picks another folder
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # read-only, no permission, a regular file where a folder should be
            raise AlignkitError(f"cannot use {self.root} as the run folder ({exc.strerror or exc}); "
                                f"choose another {self.option}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(f"{self.root} is in use by {self._holder()}; wait for it or use {self.option}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": _command()}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no stale holder named to whoever locks next
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> str:
        """``pid 1234 (alignkit run ...)`` from the lock file; the holder writes it just after locking."""
        for _ in range(20):
            try:
                info = json.loads(self.path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.05)  # the holder is between its flock and its write
        else:
            return "another process"
        where = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
        return f"pid {info.get('pid')}{where} ({info.get('command')})"


def _command() -> str:
    """This process's command line as typed (``alignkit run ...``; ``python -m alignkit`` shown the same), masked."""
    argv = list(sys.argv) or ["python"]
    program = Path(argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    return redact_text(shlex.join([name, *argv[1:]]))
