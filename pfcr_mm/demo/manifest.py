"""Idempotent generation of a demo data folder, shared by the demo generators.

A generated folder holds a few data sub-folders (``folders``) and ``manifest.json``, which records
the generation parameters (``requested``, with a ``generator`` name that marks the folder as ours)
and a sha256 over every file in those sub-folders. ``generate_idempotent`` then:

- skips when the manifest asks for the same parameters, is complete and the files still hash to it;
- regenerates when the parameters differ or the files were damaged, after checking that the data
  sub-folders hold only files the generator writes (``is_ours``);
- refuses (FileExistsError) a non-empty folder without our manifest, and a demo folder holding
  anything else, so that a user's files are never deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def tree_sha256(root: Path, folders: Sequence[str]) -> tuple[str, int]:
    """sha256 over (relative path, content) of all files in ``root/<folder>``, and their count."""
    h = hashlib.sha256()
    files = sorted(
        p
        for folder in folders
        if (root / folder).is_dir()
        for p in (root / folder).rglob("*")
        if p.is_file()
    )
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest(), len(files)


def read_manifest(root: Path, generator: str) -> dict | None:
    """The manifest in ``root`` written by ``generator``, or None (missing, unreadable, foreign)."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and manifest.get("generator") == generator
    return manifest if ours else None


def remove_previous_demo(
    root: Path, folders: Sequence[str], is_ours: Callable[[Path, bool], bool]
) -> None:
    """Delete ``root/<folder>`` for each folder, after checking they hold only our paths.

    ``is_ours(relative_path, is_dir)`` says whether a folder (``is_dir``) or a file at that path
    (relative to ``root``) is one the generator writes. Anything else (a link or other special
    file counts as a file) stops with FileExistsError before any deletion.
    """
    for name in folders:
        folder = root / name
        if not folder.exists():
            continue
        foreign = [p for p in folder.rglob("*") if not is_ours(p.relative_to(root), p.is_dir())]
        if foreign:
            raise FileExistsError(
                f"{folder} holds files the demo generator did not write (e.g. {foreign[0]}); "
                "refusing to replace it. Move them away or choose another root."
            )
    for name in folders:
        if (root / name).exists():
            shutil.rmtree(root / name)


def generate_idempotent(
    root: str | Path,
    requested: dict,
    folders: Sequence[str],
    is_ours: Callable[[Path, bool], bool],
    write: Callable[[Path], dict | None],
    description: str,
) -> dict:
    """Run ``write(root)`` unless ``root`` already holds exactly what ``requested`` describes.

    ``requested`` must hold a ``generator`` key. ``write`` fills the data folders and may return
    extra manifest fields (counts, statistics). Returns the manifest (``requested``, the extras,
    ``complete``, ``num_files``, ``sha256``) plus ``action`` (``"generated"``, ``"regenerated"``
    or ``"skipped"``), ``root`` and ``seconds``. ``description`` names the kind of folder in the
    error raised for a foreign non-empty ``root``.
    """
    start = time.perf_counter()
    root = Path(root)
    action = "generated"
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a folder")
        previous = read_manifest(root, requested["generator"])
        if previous is None:
            if any(root.iterdir()):
                raise FileExistsError(
                    f"{root} is not empty and has no demo {MANIFEST_NAME}: it is not a "
                    f"{description} folder, so it is left untouched. Choose an empty or new folder."
                )
        else:
            same = all(previous.get(k) == v for k, v in requested.items())
            if (
                same
                and previous.get("complete")
                and tree_sha256(root, folders)
                == (previous.get("sha256"), previous.get("num_files"))
            ):
                return {
                    **previous,
                    "action": "skipped",
                    "root": str(root),
                    "seconds": time.perf_counter() - start,
                }
            remove_previous_demo(root, folders, is_ours)
            action = "regenerated"

    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST_NAME
    # Written before the data: an interrupted run leaves a folder still recognised as ours
    # (complete=false), which the next call regenerates instead of refusing.
    manifest_path.write_text(json.dumps({**requested, "complete": False}, indent=2) + "\n")

    extra = write(root) or {}
    sha256, num_files = tree_sha256(root, folders)
    manifest = {
        **requested,
        **extra,
        "complete": True,
        "num_files": num_files,
        "sha256": sha256,
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "action": action, "root": str(root), "seconds": time.perf_counter() - start}
