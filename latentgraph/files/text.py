"""Reading the text files users hand us (configs, datasets, logs): UTF-8 only, every failure one clear error.

A file that is missing, unreadable, not UTF-8 or not valid JSON raises the caller's error class (an input
file is an :class:`InputError`, a checkpoint file a :class:`CheckpointError`) naming the file and the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError, LatentGraphError


def read_text(path: str | Path, *, error: type[LatentGraphError] = InputError) -> str:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist; check the path") from None
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                    "save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None


def read_json(path: str | Path, *, error: type[LatentGraphError] = InputError) -> Any:
    try:
        return json.loads(read_text(path, error=error))
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix or replace "
                    "the file") from None
