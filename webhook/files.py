"""Files that change under a running process: one atomic writer and one change watcher.

Several roles keep state in small files that another process (or another worker, or the
kubelet) replaces while they run: the CA's ``ca.crt``/``ca.key``, the server's
``tls.crt``/``tls.key``, the agent's Envoy bootstrap and SDS files. They all write with
:func:`write_atomic` and follow changes with :class:`Reloading`, so "readers never see a torn
file" and "a bad new version never replaces a good old one" are written down once.

Unlike the modules next to it, this one does I/O (``stat``, ``rename``); it holds no state of
its own beyond the objects callers create.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["Reloading", "Signature", "signature", "write_atomic"]

T = TypeVar("T")

#: Reads of a changing set of files before the last one is kept as it is.
_READ_ATTEMPTS = 3

#: (device, inode, size, mtime in ns) of each watched file, in order.
Signature = tuple[tuple[int, int, int, int], ...]


def write_atomic(
    path: Path, data: bytes, *, mode: int, owner: tuple[int, int] | None = None
) -> None:
    """Write ``data`` via a temporary file in the same directory and rename it into place.

    The temporary file has ``mode`` (and ``owner``, a (uid, gid), when given) before any byte
    is written, so a key is never briefly world-readable; readers see the old or the new
    content, never a torn one; a failure leaves no temporary file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def signature(paths: Iterable[Path]) -> Signature:
    """What identifies the current version of each file. ``stat`` follows symlinks, so a
    mounted Secret's ``..data`` swap shows as a new inode. Raises :class:`OSError`."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class Reloading(Generic[T]):
    """``load()``'s value for the current version of ``paths``, reloaded when they change.

    When: :meth:`poll` costs one clock read; at most every ``check_interval`` seconds it
    :meth:`check`\\ s, which ``stat``\\ s the files and calls ``load`` only when one of them
    changed. A ``load`` that raises one of ``refuse`` keeps the old value and is reported to
    ``on_refused``; with ``retry_refused`` the same files are tried again at the next check
    (a writer may be half-way through a pair), without it not before they change again (a
    state that was refused once will be refused again). A file missing at a check means
    "mid-swap": the old value stays and nothing is reported.

    The first ``stat`` and ``load`` happen in the constructor and raise: a broken start fails
    loudly. Not locked: callers on several threads may both reload; each result is complete.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        load: Callable[[], T],
        *,
        refuse: tuple[type[Exception], ...],
        on_reload: Callable[[T], None] | None = None,
        on_refused: Callable[[Exception], None] | None = None,
        retry_refused: bool = False,
        check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = tuple(paths)
        self.check_interval = check_interval
        self._load = load
        self._refuse = refuse
        self._on_reload = on_reload
        self._on_refused = on_refused
        self._retry_refused = retry_refused
        self._clock = clock
        self._seen = signature(self.paths)
        self.value = load()
        self._refused: Signature | None = None
        self._next_check = clock() + check_interval
        self.reloads = 0

    def poll(self) -> T:
        """The current value, after a :meth:`check` when the interval is over."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self.check()
        return self.value

    def check(self) -> bool:
        """Reload now if the files changed; ``True`` when a new value is in use."""
        try:
            current = signature(self.paths)
        except OSError:
            return False
        if current == self._seen or current == self._refused:
            return False
        # The files may move while they are stat'ed or read (a writer swapping a pair): the
        # value is kept with the signature taken *after* a read that saw no change, so one
        # change is one reload, never a second one for a version already loaded.
        for _ in range(_READ_ATTEMPTS):
            try:
                value = self._load()
            except self._refuse as exc:
                if not self._retry_refused:
                    self._refused = current
                if self._on_refused is not None:
                    self._on_refused(exc)
                return False
            try:
                after = signature(self.paths)
            except OSError:
                return False
            if after == current:
                break
            current = after
        self.value, self._seen, self._refused = value, current, None
        self.reloads += 1
        if self._on_reload is not None:
            self._on_reload(value)
        return True
