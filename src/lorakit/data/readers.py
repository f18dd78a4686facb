"""Read dataset files into records: a list of plain dicts, one per example, in file order.

Supported formats (``format=`` names; ``"auto"`` picks one from the extension and header):

| format  | files                        | records                                              |
|---------|------------------------------|------------------------------------------------------|
| `jsonl` | `.jsonl`, `.jsonlines`       | each line's JSON object as is                        |
| `json`  | `.json`                      | a top-level JSON array of objects (or JSON lines)    |
| `text`  | `.txt`                       | `{"text": line}` per non-empty line, or the whole file |
| `csv`   | `.csv`                       | one dict per row, keyed by the header                |
| `tsv`   | `.tsv`                       | as `csv`, tab-separated                              |
| `glue`  | GLUE SST-2 / MRPC / RTE TSVs | canonical columns `text`, `text_pair`, `label`, `idx` |
| `e2e`   | E2E NLG challenge CSVs       | canonical columns `prompt` (the MR), `completion` (the reference) |

Any path may end in `.gz`; the extension before it decides the format. With ``"auto"``, a
`.tsv` whose header is a known GLUE layout reads as `glue`, and a `.csv` whose header is
`mr,ref` (or `MR` alone, the unreferenced test set) reads as `e2e`; pass `format="tsv"` or
`"csv"` to keep the file's own column names instead.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

FORMATS = ("auto", "jsonl", "json", "text", "csv", "tsv", "glue", "e2e")

# GLUE layouts, keyed by their header row (lowercased, BOM stripped). Each maps the file's
# columns to canonical ones and says how the file quotes fields: MRPC and SST-2 hold
# unbalanced '"' inside sentences and must be read without quote handling, while the RTE
# export quotes fields the CSV way.
_GLUE_LAYOUTS: dict[tuple[str, ...], tuple[str, dict[str, str], bool]] = {
    ("sentence", "label"): ("SST-2", {"sentence": "text", "label": "label"}, False),
    ("index", "sentence"): ("SST-2 test", {"index": "idx", "sentence": "text"}, False),
    ("quality", "#1 id", "#2 id", "#1 string", "#2 string"): (
        "MRPC",
        {"quality": "label", "#1 string": "text", "#2 string": "text_pair"},
        False,
    ),
    ("index", "#1 id", "#2 id", "#1 string", "#2 string"): (
        "MRPC test",
        {"index": "idx", "#1 string": "text", "#2 string": "text_pair"},
        False,
    ),
    ("sentence1", "sentence2", "label", "idx"): (
        "RTE",
        {"sentence1": "text", "sentence2": "text_pair", "label": "label", "idx": "idx"},
        True,
    ),
    ("index", "sentence1", "sentence2", "label"): (
        "RTE (GLUE original)",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair", "label": "label"},
        False,
    ),
    ("index", "sentence1", "sentence2"): (
        "RTE test (GLUE original)",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair"},
        False,
    ),
}

_E2E_HEADERS = {("mr", "ref"), ("mr",)}


def load_records(
    path: str | Path,
    format: str = "auto",
    *,
    text_unit: str = "line",
    delimiter: str | None = None,
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Read a dataset file into a list of dicts, in file order.

    Args:
        path: the file; a trailing `.gz` is decompressed on the fly.
        format: one of `FORMATS`; `"auto"` detects it (see the module docstring).
        text_unit: for `text` files, `"line"` (one record per non-empty line, trailing
            newline removed) or `"file"` (the whole file is one record).
        delimiter: overrides the field separator of `csv` / `tsv` files.
        encoding: text encoding; a UTF-8 byte-order mark is always dropped.
        limit: keep only the first `limit` records (None keeps all).

    Returns:
        A non-empty list of dicts. CSV/TSV values are strings exactly as in the file;
        JSON values keep their JSON types.

    Raises:
        ConfigError: the file is missing or unreadable, the format is unknown or does not
            fit the file (bad JSON line, ragged CSV row, unknown GLUE header), or the file
            holds no records.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(
            f"Unknown data format {format!r} for {path}. Use one of: {', '.join(FORMATS)}."
        )
    if text_unit not in ("line", "file"):
        raise ConfigError(f"text_unit must be 'line' or 'file', got {text_unit!r}.")
    text = _read_text(path, encoding)
    fmt = detect_format(path, text) if format == "auto" else format

    if fmt == "jsonl":
        records = _parse_jsonl(text, path)
    elif fmt == "json":
        records = _parse_json(text, path)
    elif fmt == "text":
        if text_unit == "file":
            records = [{"text": text}] if text.strip() else []
        else:
            records = [{"text": line} for line in text.splitlines() if line.strip()]
    elif fmt in ("csv", "tsv"):
        sep = delimiter or ("\t" if fmt == "tsv" else ",")
        records = _parse_delimited(text, path, sep, quoting="auto")
    elif fmt == "glue":
        records = _parse_glue(text, path)
    else:  # e2e
        records = _parse_e2e(text, path)

    if limit is not None:
        records = records[:limit]
    if not records:
        raise ConfigError(
            f"No records in {path} (read as {fmt!r}). Check that the file is not empty, that "
            f"the format is right (pass format= one of {', '.join(FORMATS[1:])}), and that "
            f"limit is positive."
        )
    return records


def detect_format(path: str | Path, text: str | None = None) -> str:
    """The format `load_records(path, "auto")` would use.

    Decided by the extension (before any `.gz`); `.tsv` / `.csv` files are further looked
    at: a GLUE or E2E header makes them `glue` / `e2e`. `text` is the file's content, if
    already read (else the header is read from disk).

    Raises:
        ConfigError: the extension is not one lorakit reads, or the file cannot be read.
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".jsonlines", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext in (".txt", ".text"):
        return "text"
    if ext in (".csv", ".tsv"):
        if text is None:
            text = _read_text(path, "utf-8")
        first = text.split("\n", 1)[0].rstrip("\r")
        sep = "\t" if ext == ".tsv" else ","
        header = tuple(h.strip().strip('"').lower() for h in first.split(sep))
        if ext == ".tsv" and header in _GLUE_LAYOUTS:
            return "glue"
        if ext == ".csv" and header in _E2E_HEADERS:
            return "e2e"
        return ext[1:]
    raise ConfigError(
        f"Cannot tell the format of {path} from its extension {ext or '(none)'!r}. Rename it "
        f"(.jsonl, .json, .txt, .csv, .tsv, optionally + .gz) or pass format= one of "
        f"{', '.join(FORMATS[1:])}."
    )


def group_references(
    records: Iterable[Mapping[str, Any]], source: str = "prompt", target: str = "completion"
) -> list[tuple[str, list[str]]]:
    """Group consecutive records that share a source into `(source, [targets])`, in file order.

    This is how the official E2E scorer pairs one system output with its references: the
    E2E CSVs list every reference of a meaning representation (MR) on consecutive rows.
    A source that comes back later, not adjacent, starts a new group (as in the scorer).
    Records from `load_records(..., "e2e")` use `prompt` (MR) and `completion` (reference);
    pass `source="mr", target="ref"` for the raw CSV columns.

    Raises:
        ConfigError: a record lacks `source` or `target`, or there are no records.
    """
    groups: list[tuple[str, list[str]]] = []
    for i, rec in enumerate(records):
        for key in (source, target):
            if key not in rec:
                raise ConfigError(
                    f"Record {i} has no column {key!r} to group references by; it has: "
                    f"{', '.join(map(str, rec)) or '(none)'}. Pass source= and target= "
                    f"naming the input and reference columns."
                )
        src, ref = str(rec[source]), str(rec[target])
        if groups and groups[-1][0] == src:
            groups[-1][1].append(ref)
        else:
            groups.append((src, [ref]))
    if not groups:
        raise ConfigError("No records to group into references: the dataset is empty.")
    return groups


# ---------------------------------------------------------------------------- internals


def _read_text(path: Path, encoding: str) -> str:
    """The whole file as text, BOM dropped. Raises ConfigError naming the file."""
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
        text = raw.decode(encoding)
    except FileNotFoundError as e:
        raise ConfigError(f"Data file {path} does not exist. Check the path.") from e
    except IsADirectoryError as e:
        raise ConfigError(f"Data path {path} is a directory; pass a file inside it.") from e
    except PermissionError as e:
        raise ConfigError(f"Data file {path} is not readable (permission denied).") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise ConfigError(f"Cannot read data file {path}: {e}.") from e
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"Data file {path} is not valid {encoding} text (byte {e.start}: {e.reason}). "
            f"Pass encoding= with the file's encoding, or convert it to UTF-8."
        ) from e
    return text.removeprefix("\ufeff")


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}, line {lineno}: not valid JSON ({e.msg} at column {e.colno}). Each "
                f"line of a JSONL file must be one JSON object."
            ) from e
        if not isinstance(obj, dict):
            raise ConfigError(
                f"{path}, line {lineno}: expected a JSON object per line, got {type(obj).__name__}."
            )
        records.append(obj)
    return records


def _parse_json(text: str, path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return _parse_jsonl(text, path)  # a .json file that is really JSON lines
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise ConfigError(
            f"{path}: expected a JSON array of objects (one per example) or JSON lines."
        )
    return obj


def _parse_delimited(text: str, path: Path, delimiter: str, quoting: str) -> list[dict[str, str]]:
    """Rows as dicts keyed by the header. quoting: 'csv', 'none' or 'auto' (csv, else none)."""
    if quoting == "auto":
        try:
            return _parse_delimited(text, path, delimiter, "csv")
        except ConfigError:
            # TSVs such as GLUE's MRPC hold lone '"' characters that CSV quoting would read as
            # the start of a quoted field, swallowing tabs and newlines: read them verbatim.
            return _parse_delimited(text, path, delimiter, "none")
    mode = csv.QUOTE_MINIMAL if quoting == "csv" else csv.QUOTE_NONE
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=mode))
    except csv.Error as e:
        raise ConfigError(f"{path}: not a valid delimited file ({e}).") from e
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    records = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ConfigError(
                f"{path}, row {i}: {len(row)} fields where the header has {len(header)} "
                f"({', '.join(header)}). Check the delimiter ({delimiter!r}) and quoting."
            )
        records.append(dict(zip(header, row, strict=True)))
    return records


def _parse_glue(text: str, path: Path) -> list[dict[str, str]]:
    first = text.split("\n", 1)[0].rstrip("\r")
    header = tuple(h.strip().lower() for h in first.split("\t"))
    if header not in _GLUE_LAYOUTS:
        known = "; ".join(f"{name}: {' | '.join(h)}" for h, (name, _, _) in _GLUE_LAYOUTS.items())
        raise ConfigError(
            f"{path}: header {' | '.join(header)!r} is not a GLUE layout lorakit knows ({known}). "
            f"Read it with format='tsv' and name the columns in the data config instead."
        )
    _, mapping, quoted = _GLUE_LAYOUTS[header]
    rows = _parse_delimited(text, path, "\t", "csv" if quoted else "none")
    return [{mapping[k.lower()]: v for k, v in row.items() if k.lower() in mapping} for row in rows]


def _parse_e2e(text: str, path: Path) -> list[dict[str, str]]:
    rows = _parse_delimited(text, path, ",", "csv")
    if rows and tuple(k.lower() for k in rows[0]) not in _E2E_HEADERS:
        raise ConfigError(
            f"{path}: an E2E file needs the header 'mr,ref' (or 'MR' alone), found "
            f"{','.join(rows[0])!r}. Read it with format='csv' to keep its own columns."
        )
    out = []
    for row in rows:
        low = {k.lower(): v for k, v in row.items()}
        rec = {"prompt": low["mr"]}
        if "ref" in low:
            rec["completion"] = low["ref"]
        out.append(rec)
    return out
