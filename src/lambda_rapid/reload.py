"""Reload on change (``RELOAD_ON_CHANGE``): watch the function's code and, when a file changes,
replace the function's instances while the daemon, its listeners and its AMQP queue stay up.

This module owns the watching only: watchfiles' ``awatch`` (the library behind uvicorn's
``--reload``) with its own debounce and its ``DefaultFilter`` (no ``__pycache__``, ``*.pyc``, editor
swap and backup files, ``.git``). What replacing means (idle instances stop now, busy ones after
their invocation, the next invocation gets a fresh one) is :meth:`Pool.retire_all`'s business.
watchfiles has a compiled extension: this module is imported only when the setting is on, so the
HTTP-only daemon never loads it, and the single-file build (which cannot carry it) says so at start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Optional, Sequence

from .pool import Pool

log = logging.getLogger(__name__)

NAMED_FILES = 10  # changed files named in the reload line; the rest are counted
STOP_TIMEOUT = 2.0  # seconds to wait for the watcher at shutdown (its thread checks for stop every 50 ms)
# What pyproject.toml pins for this Python (1.3.0 needs 3.10).
WATCHFILES_PIN = "watchfiles==1.3.0" if sys.version_info >= (3, 10) else "watchfiles==1.1.1"


class ReloadUnavailable(Exception):
    """Reloading cannot start; the message is the one line shown at start-up."""


class Reloader:
    def __init__(self, pool: Pool, task_root: str, directories: Sequence[str]) -> None:
        try:
            import watchfiles
        except ImportError as e:
            raise ReloadUnavailable(
                f"RELOAD_ON_CHANGE=true needs the watchfiles package, which this Python cannot import ({e}); "
                f"pip install '{WATCHFILES_PIN}' (the single-file build cannot carry it: it has a compiled "
                "extension)") from None
        self.pool = pool
        self.task_root = task_root
        self.directories = tuple(directories)
        self._awatch = watchfiles.awatch
        self._filter = watchfiles.DefaultFilter()
        self._added, self._deleted = watchfiles.Change.added, watchfiles.Change.deleted
        self._stop = asyncio.Event()
        self._task: Optional[asyncio.Task] = None
        self._watching = False
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            logging.getLogger("watchfiles").setLevel(logging.WARNING)  # its own "N changes detected" lines

    async def start(self) -> None:
        """Start watching; returns once the watcher is in place (a change from then on is seen)."""
        changes = self._awatch(*self.directories, watch_filter=self._filter, stop_event=self._stop)
        self._task = asyncio.get_event_loop().create_task(self._watch(changes), name="reload")
        # The task's first step sets the watches up (watchfiles adds them when iteration starts,
        # before its first wait) and then waits: one turn of the loop, and they are in place.
        await asyncio.sleep(0)
        if self._task.done():
            error = self._task.exception() if not self._task.cancelled() else None
            raise ReloadUnavailable(f"RELOAD_ON_CHANGE: cannot watch {', '.join(self.directories)}: {error}")
        self._watching = True
        log.info("reload on change: watching %s", ", ".join(self.directories))

    async def _watch(self, changes) -> None:
        try:
            async for batch in changes:
                self.reload(batch)
        except Exception as e:
            if not self._watching:
                raise  # start() makes it the start-up error
            log.error("reload on change stopped: cannot watch %s: %s", ", ".join(self.directories), e)

    def reload(self, changes: set) -> None:
        """Files changed (a debounced batch of (change, path)): replace the instances, say which."""
        if not self.pool.accepting:
            return
        # A file added and deleted in one batch that is gone now came and went (``sed -i``'s and
        # some editors' temporary files): not a change of the code. (One deleted and written again
        # by an editor's save is still there.)
        added = {path for change, path in changes if change == self._added}
        deleted = {path for change, path in changes if change == self._deleted}
        passing = {path for path in added & deleted if not os.path.lexists(path)}
        # A directory is named by the files that change in it.
        paths = {path for _, path in changes if not os.path.isdir(path)} - passing
        if not paths:
            return
        names = sorted(os.path.relpath(path, self.task_root) for path in paths)
        shown = ", ".join(names[:NAMED_FILES])
        if len(names) > NAMED_FILES:
            shown += f" and {len(names) - NAMED_FILES} more"
        count = self.pool.retire_all()
        log.info("reload: %s changed; replacing %d instance%s", shown, count, "" if count == 1 else "s")

    async def stop(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        self._stop.set()
        try:
            await asyncio.wait_for(task, STOP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("reload on change: the watcher did not stop within %gs", STOP_TIMEOUT)
