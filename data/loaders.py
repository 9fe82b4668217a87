"""Read every supported source into neutral `Conversation`s (see data/types.py).

Formats, each parsed in its own module (whose docstring lists what is read and which quirks of
the real data are handled and counted in `LoadStats`):

* **APIGen-MT** ShareGPT-like JSON rows: `data.source_apigen.parse_apigen_rows`;
* **tau-bench** trajectories (`traj` or `messages`, `reward`): `data.source_tau.parse_tau_rows`;
* **ALMITA** (Zendesk) CSV, one row per turn: `data.source_almita.parse_almita_csv`.

This module reads files (a JSON array, one object or JSON lines; a CSV), detects their format by
content (`detect_format`) and resolves dataset specs, "synthetic:<split>" included
(`load_dataset`).  The shared row machinery (`DataError`, `LoadStats`, tool schemas) is in
`data.rows`.

Error handling (`on_error`): "raise" stops at the first malformed row with a `DataError` naming
the file, the row index and the field; "skip" drops the whole row (for the CSV: the whole
conversation the bad line belongs to), counts it and records the reason.
"""

from __future__ import annotations

import csv
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from data.rows import DataError, LoadStats, _check_on_error
from data.source_almita import ALMITA_COLUMNS, _normalize_header, parse_almita_csv
from data.source_apigen import parse_apigen_rows
from data.source_tau import _tau_file_tools, parse_tau_rows
from data.types import Conversation

FORMATS: tuple[str, ...] = ("apigen", "tau", "almita")
SYNTHETIC_SPLITS: tuple[str, ...] = ("train", "test", "ood_test", "coldstart")
SYNTHETIC_PREFIX = "synthetic:"


def _read_json_rows(text: str, source: str) -> list[Any]:
    """A JSON array, a single JSON object, or JSON lines."""
    try:
        value = json.loads(text)
        return value if isinstance(value, list) else [value]
    except json.JSONDecodeError as whole_error:
        rows = []
        for line_number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(source, None, None,
                                f"not valid JSON ({whole_error.msg} at char {whole_error.pos}) "
                                f"nor JSON lines (line {line_number + 1})") from None
        return rows


def detect_format(text: str, source: str = "<text>") -> str:
    """'apigen', 'tau' or 'almita' from the content: JSON rows with `conversations` are APIGen,
    JSON rows with `traj` or `messages` are tau-bench, anything else that has a CSV header with a
    recognisable role column is ALMITA."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped[:1] in ("[", "{"):
        rows = _read_json_rows(stripped, source)
        first = next((row for row in rows if isinstance(row, dict)), None)
        if first is not None and "conversations" in first:
            return "apigen"
        if first is not None and ("traj" in first or "messages" in first):
            return "tau"
        keys = sorted(first) if first is not None else []
        raise DataError(source, None, None,
                        f"cannot detect the format: JSON rows without 'conversations' (APIGen) or 'traj'/'messages' "
                        f"(tau-bench); first row keys: {keys}. Pass format= / --format to force one")
    header = next(csv.reader(stripped.splitlines()[:1]), [])
    normalized = {_normalize_header(name) for name in header}
    if len(header) > 1 and normalized & set(ALMITA_COLUMNS["role"]):
        return "almita"
    raise DataError(source, None, None,
                    "cannot detect the format: neither JSON nor a CSV header with a role column. "
                    "Pass format= / --format to force one")


def load_conversations(
    path: str | Path, *, format: str | None = None, on_error: str = "raise", include_failed: bool = False,
) -> tuple[list[Conversation], LoadStats]:
    """Read one file of any supported format (auto-detected by content unless `format` is given)."""
    _check_on_error(on_error)
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise DataError(source, None, None, "no such file")
    text = path.read_text(encoding="utf-8-sig")
    format = format or detect_format(text, source)
    if format == "almita":
        return parse_almita_csv(text, source=source, on_error=on_error)
    rows = _read_json_rows(text, source)
    if format == "apigen":
        return parse_apigen_rows(rows, source=source, on_error=on_error)
    return parse_tau_rows(rows, source=source, on_error=on_error, include_failed=include_failed,
                          tools=_tau_file_tools(path))


@lru_cache(maxsize=4)
def _synthetic_splits(seed: int) -> dict[str, list[dict[str, Any]]]:
    # Imported here so that the data layer works (and its tests run) without the generator.
    from data.synthetic import generate_splits

    return generate_splits(seed=seed)


def load_dataset(
    spec: str, *, seed: int = 0, on_error: str = "raise", include_failed: bool = False, format: str | None = None,
) -> tuple[list[Conversation], LoadStats]:
    """A file path, or "synthetic:<split>" with split in train / test / ood_test / coldstart.

    Synthetic splits are generated in memory by `data.synthetic.generate_splits(seed=seed)` (cached
    per seed in this process) as APIGen-MT rows and read by the APIGen parser, exactly like a file.
    """
    if spec.startswith(SYNTHETIC_PREFIX):
        split = spec[len(SYNTHETIC_PREFIX):]
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"unknown synthetic split {split!r} in {spec!r}; expected one of {SYNTHETIC_SPLITS}")
        rows = _synthetic_splits(seed)[split]
        return parse_apigen_rows(rows, source=f"synthetic:{split}(seed={seed})", on_error=on_error)
    return load_conversations(spec, format=format, on_error=on_error, include_failed=include_failed)
