"""Where files come from: local directories or Hugging Face hub repos (through the local cache).

A source that names a local folder is that folder (``~`` expanded; put back first where a save killed midway
left it aside, see :func:`~latentgraph.files.atomic.recover`). A source that cannot be a hub repo id (an
absolute path, ``./x``, ``~/x``, ``a/b/c``: see :func:`looks_like_path`) and names no folder is a
:class:`CheckpointError` saying the folder does not exist. Anything else is a hub repo id: hub access goes
through ``huggingface_hub``, so ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_TOKEN`` work as usual, and a repo
that is neither cached nor reachable is a :class:`CheckpointError` naming the repo and how to fetch it on a
connected machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import CheckpointError
from .atomic import recover

# Files of a published agent repo that belong to its links, not to its base model.
LINK_FILES = ("adapter_config.json", "innerlink_config.json", "*.pt", "README.md")


def looks_like_path(source: str | Path) -> bool:
    """Whether ``source`` can only name a local folder: a ``Path``, or a string that is no valid hub repo id
    (``name`` or ``owner/name`` of letters, digits, ``-``, ``_`` and ``.``, as huggingface_hub checks them)."""
    if isinstance(source, Path):
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def local_folder(source: str | Path, what: str = "folder") -> Path | None:
    """The local folder ``source`` names, or None when it names none and may be a hub repo id.

    ``~`` is expanded, and a folder that a save killed midway left aside is put back first. A source that
    can only be a path (:func:`looks_like_path`) and names no folder is a :class:`CheckpointError` calling it
    the ``what``.
    """
    folder = recover(Path(source).expanduser())
    if folder.is_dir():
        return folder
    if not looks_like_path(source):
        return None
    if folder.exists():
        raise CheckpointError(f"{str(source)!r} is a file, not a {what}; pass the folder that holds the files")
    raise CheckpointError(f"{what} {str(source)!r} does not exist; check the path (a hub repo id looks like "
                          "'org/name')")


def fetch(source: str | Path, *, revision: str | None = None, allow: list[str] | None = None,
          ignore: list[str] | None = None) -> Path:
    """A local directory holding ``source``: the folder itself (see :func:`local_folder`), or a snapshot of
    the hub repo.

    ``allow`` and ``ignore`` are glob patterns limiting what is downloaded from the hub.
    """
    if (folder := local_folder(source)) is not None:
        return folder
    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=allow, ignore_patterns=ignore))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(missing_repo_message(str(source), revision, e)) from None


def missing_repo_message(repo: str, revision: str | None, error: Exception) -> str:
    at = f" at revision {revision}" if revision else ""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true") else ""
    return (
        f"hub repo '{repo}'{at} is neither cached nor reachable{offline}: {type(error).__name__}. "
        f"On a connected machine run `hf download {repo}` (or `huggingface-cli download {repo}`) and copy its "
        "hub cache here (the folder HF_HUB_CACHE points to), or pass a local directory instead"
    )


def plain_view(directory: Path) -> Path:
    """``directory`` without the link files of a published agent repo.

    A published agent repo holds a full base model *and* an ``adapter_config.json``; with ``peft`` installed,
    transformers would load such a folder as a PEFT adapter. The view is a temporary folder of symlinks to
    everything else, removed at exit. Folders without that file are returned as they are.
    """
    if not (directory / "adapter_config.json").exists():
        return directory
    view = Path(tempfile.mkdtemp(prefix="latentgraph-plain-"))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    for item in directory.iterdir():
        if not any(item.match(pattern) for pattern in LINK_FILES):
            (view / item.name).symlink_to(item.resolve())
    return view
