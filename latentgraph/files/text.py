"""Reading the text files users hand us (configs, datasets, logs): UTF-8 only, every failure one clear error.

A file that is missing, unreadable, not UTF-8 or not valid JSON or YAML raises the caller's error class (an
input file is an :class:`InputError`, a checkpoint file a :class:`CheckpointError`) naming the file and the fix.

Valid JSON or YAML can still be more than Python converts: an integer of thousands of digits (Python refuses
those over ``sys.get_int_max_str_digits()``, 4300 by default) or lists nested deeper than the recursion limit.
No real file holds either, but a damaged or hostile one may, so both are errors like bad syntax, never a
traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError, LatentGraphError

DEEP = "its lists or mappings are nested too deeply"


class NotJSON(ValueError):
    """Why :func:`parse_json` could not read a text; ``str()`` completes "<the text> is ...", e.g.
    ``not valid JSON (Expecting value at column 1)``."""


def parse_json(text: str) -> Any:
    """``json.loads``, with each way it fails (bad syntax, a number Python will not convert, nesting too deep)
    as one :class:`NotJSON` that says which."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}" if "\n" in text.strip() else f"column {e.colno}"
        raise NotJSON(f"not valid JSON ({e.msg} at {where})") from None
    except ValueError as e:  # json's only other ValueError: an integer over Python's digit limit
        raise NotJSON(f"not JSON Python can read: {_unconvertible(e)}") from None
    except RecursionError:
        raise NotJSON(f"not JSON Python can read: {DEEP}") from None


def _unconvertible(error: ValueError) -> str:
    """A value Python refused to convert, said without Python's advice to raise its digit limit."""
    return f"it holds a value that cannot be converted ({str(error).split('; use sys.')[0]})"


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
    text = read_text(path, error=error)
    try:
        return parse_json(text)
    except NotJSON as e:
        raise error(f"{path} is {e}; fix or replace the file") from None


def read_yaml(path: str | Path, *, error: type[LatentGraphError] = InputError) -> Any:
    import yaml

    text = read_text(path, error=error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path} is not valid YAML ({e}); fix or replace the file") from None
    except ValueError as e:  # a scalar YAML resolves but Python refuses: a huge integer, a date like 2001-13-45
        raise error(f"{path} is not YAML Python can read: {_unconvertible(e)}; fix or replace the file") from None
    except RecursionError:
        raise error(f"{path} is not YAML Python can read: {DEEP}; fix or replace the file") from None
