"""Stage checkpoints: written with a digest of their bytes, verified before anything reads them.

A trial keeps its last two stage checkpoints. On a restore it continues from the newest one that verifies; a
checkpoint that is missing, truncated or altered is never used (a silently wrong resume is worse than a
repeated stage). With none left, the trial starts again from stage 1. Either way the run replays exactly
what an uninterrupted one does (every stage draws from its own seeds), and one warning line says what happened.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
DIGEST_FILE = "state.sha256"
KEEP = 2  # the newest stage checkpoint and the one before it


class CheckpointInvalid(Exception):
    """A stage checkpoint that must not be used; the message says why."""


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(folder: Path, state: dict) -> None:
    """The run state and the sha256 of its file, side by side in `folder`."""
    path = Path(folder) / STATE_FILE
    torch.save(state, path)
    (Path(folder) / DIGEST_FILE).write_text(file_sha256(path) + "\n")


def read(folder: Path) -> dict:
    """The state in `folder` after checking it against its digest; CheckpointInvalid says what is wrong."""
    folder = Path(folder)
    path, digest = folder / STATE_FILE, folder / DIGEST_FILE
    if not path.is_file():
        raise CheckpointInvalid(f"{folder.name}: {STATE_FILE} is missing")
    if not digest.is_file():
        raise CheckpointInvalid(f"{folder.name}: {DIGEST_FILE} is missing, so {STATE_FILE} cannot be verified")
    if file_sha256(path) != digest.read_text().strip():
        raise CheckpointInvalid(f"{folder.name}: {STATE_FILE} does not match its digest (altered or truncated)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (matching bytes that torch cannot read: written by something else)
        raise CheckpointInvalid(f"{folder.name}: {STATE_FILE} is unreadable ({str(e).splitlines()[0]})") from None


def inspect(folders: list[Path]) -> tuple[dict | None, Path | None, list[str]]:
    """(state, folder) of the newest folder that verifies (folders newest first), or (None, None); and why
    each newer one was skipped."""
    skipped = []
    for folder in folders:
        try:
            return read(folder), Path(folder), skipped
        except CheckpointInvalid as e:
            skipped.append(str(e))
    return None, None, skipped


def newest_valid(folders: list[Path], what: str) -> tuple[dict | None, Path | None]:
    """(state, folder) of the newest folder that verifies (folders newest first); (None, None) if none does.
    One warning line when anything was skipped."""
    state, folder, skipped = inspect(folders)
    if skipped and state is not None:
        log.warning("%s: skipped %s; continuing after stage %d from %s", what, "; ".join(skipped),
                    state["next_stage"], folder.name)
    elif skipped:
        log.warning("%s: no stage checkpoint verifies (%s); starting again from stage 1", what, "; ".join(skipped))
    return state, folder


def copies_folder(state_dir: str | Path, trial_id: str) -> Path:
    """Where clorch keeps a trial's own verified copies of its last stage states (beside Ray's checkpoint)."""
    return Path(state_dir) / "stages" / trial_id


def keep_copy(folder: Path, stage: int, state: dict) -> None:
    """Write the state after `stage` as folder/stage_<stage> and drop all but the newest KEEP copies."""
    target = Path(folder) / f"stage_{stage:05d}"
    target.mkdir(parents=True, exist_ok=True)
    write(target, state)
    for old in sorted(Path(folder).glob("stage_*"))[:-KEEP]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def candidates(latest: Path | None, copies: Path | None) -> list[Path]:
    """Checkpoint folders of one trial, newest first: `latest` (Ray's, which may be gone or bad), then the
    copies (stage_* folders, or Ray Train's checkpoint_* folders; both names sort by age)."""
    folders = [Path(latest)] if latest is not None else []
    if copies is not None and Path(copies).is_dir():
        found = [p for p in Path(copies).iterdir() if p.is_dir() and p.name.startswith(("stage_", "checkpoint_"))]
        folders += [p for p in sorted(found, key=lambda p: p.name, reverse=True) if p not in folders]
    return folders
