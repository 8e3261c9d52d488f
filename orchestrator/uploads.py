"""Artifact uploads off Tune's event loop: one writer thread per sweep driver, fed through a bounded queue.

Tune calls clorch's MLflow callback from its event loop, so an upload there (a paper-size codebook or model is
tens of megabytes) would hold up every trial's next result for as long as the store takes. The callback only
queues the upload; this thread makes it. A stage checkpoint that an upload reads is hard-linked into a spool
folder first (`<sweep state>/uploads`), so that Tune may delete its own copy meanwhile (it keeps one per trial).

The queue is bounded, so a store slower than the sweep cannot grow it (or the spool) without end: past the bound,
an upload that may be dropped (a stage's codebooks) is, with a warning; one that may not (a final model, an
accuracy matrix) waits for room. Failures are warnings, as for every artifact: the metrics and run status go
through the outbox (orchestrator.tracking), and accuracy matrices, the last stage's codebooks (with the keys)
and final models are checked for and logged again at the sweep's end and on `clorch resume`.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

SPOOL = "uploads"


@dataclass
class Upload:
    """One queued upload: `fn(client)` writes it, `what` names it in warnings, `spool` is removed afterwards."""

    what: str
    fn: Callable[[object], None]
    spool: Path | None = None


class Uploader:
    """A daemon thread that runs queued uploads in order with its own MLflow client."""

    def __init__(self, make_client: Callable[[], object], spool_root: Path, max_queued: int = 8):
        self._make_client, self.spool_root = make_client, Path(spool_root)
        self._queue: queue.Queue[Upload | None] = queue.Queue(maxsize=max_queued)
        self._thread: threading.Thread | None = None
        self.failures = 0  # uploads that raised (each one logged as a warning)
        self.dropped = 0  # uploads skipped because the queue was full

    def spool(self, folder: Path) -> Path | None:
        """A private copy of a checkpoint folder's files (hard links where the file system allows, else
        copies) that stays while its upload waits; None if the folder is gone."""
        folder = Path(folder)
        if not folder.is_dir():
            return None
        target = self.spool_root / uuid.uuid4().hex
        target.mkdir(parents=True)
        for f in folder.iterdir():
            if f.is_file():
                try:
                    os.link(f, target / f.name)
                except OSError:  # another file system, or one without hard links
                    shutil.copy2(f, target / f.name)
        return target

    def submit(self, upload: Upload, may_drop: bool) -> None:
        """Queue `upload`; when the queue is full, drop it (may_drop, with a warning) or wait for room."""
        self._start()
        try:
            self._queue.put(upload, block=not may_drop)
        except queue.Full:
            self.dropped += 1
            log.warning("MLflow is slower than the sweep: %d uploads wait already; %s is not logged",
                        self._queue.maxsize, upload.what)
            _remove(upload.spool)

    def drain(self) -> None:
        """Wait until every queued upload has been made (or has failed)."""
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        """Drain the queue and stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="clorch-uploads", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        client = None
        while True:
            upload = self._queue.get()
            try:
                if upload is None:
                    return
                if client is None:
                    client = self._make_client()
                upload.fn(client)
            except Exception as e:  # noqa: BLE001 (any tracking failure: artifacts are worth a warning)
                self.failures += 1
                log.warning("could not log %s to MLflow: %s", upload.what,
                            (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
            finally:
                if upload is not None:
                    _remove(upload.spool)
                self._queue.task_done()

    def clear_spool(self) -> None:
        """Remove what a driver that died left in the spool (its uploads are lost with it; models are logged
        again by the check at the sweep's end)."""
        if self.spool_root.is_dir() and self._thread is None:
            shutil.rmtree(self.spool_root, ignore_errors=True)


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
