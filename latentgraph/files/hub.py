"""Where files come from: local directories or Hugging Face hub repos (through the local cache).

Hub access goes through ``huggingface_hub``, so ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``HF_TOKEN`` work as
usual. A repo that is neither cached nor reachable is a :class:`CheckpointError` naming the repo and how to
fetch it on a connected machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from ..errors import CheckpointError

# Files of a published agent repo that belong to its links, not to its base model.
LINK_FILES = ("adapter_config.json", "innerlink_config.json", "*.pt", "README.md")


def is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def fetch(source: str | Path, *, revision: str | None = None, allow: list[str] | None = None,
          ignore: list[str] | None = None) -> Path:
    """A local directory holding ``source``: the directory itself, or a snapshot of the hub repo.

    ``allow`` and ``ignore`` are glob patterns limiting what is downloaded from the hub.
    """
    if is_local(source):
        return Path(source)
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
