"""Read dataset files into records: a list of plain dicts, one per example, in file order.

Supported formats (``format=`` names; ``"auto"`` picks one from the extension and header):

| format     | files                                | records                                         |
|------------|--------------------------------------|-------------------------------------------------|
| `jsonl`    | `.jsonl`, `.jsonlines`, `.ndjson`    | each line's JSON object as is                   |
| `json`     | `.json`                              | a top-level JSON array of objects (or JSON lines) |
| `text`     | `.txt`                               | `{"text": line}` per non-empty line, or the whole file |
| `csv`      | `.csv`                               | one dict per row, keyed by the header (or by `columns=`) |
| `tsv`      | `.tsv`                               | as `csv`, tab-separated                         |
| `glue`     | the GLUE tasks' TSVs (`GLUE_TASKS`)  | canonical columns `text`, `text_pair`, `label`, `idx` |
| `e2e`      | E2E NLG challenge CSVs               | `prompt` (the MR), `completion` (the reference) |
| `parquet`  | `.parquet`, `.pq`                    | one dict per row, read with `datasets`          |
| `arrow`    | `.arrow`: a `datasets` cache file or an Arrow IPC file | as `parquet`                  |
| `datasets` | a `save_to_disk` folder (of a `DatasetDict`: one split's folder, `dir/train`) | as `parquet` |

Any text file may end in `.gz`; the extension before it decides the format. With ``"auto"``,
a `.tsv` whose header (or, for CoLA, whose header-less first row) is a known GLUE layout
reads as `glue`, and a `.csv` whose header is `mr,ref` (or `MR` alone, the unreferenced test
set) reads as `e2e`; pass `format="tsv"` or `"csv"` to keep the file's own column names
instead. A CSV/TSV without a header row is read with `columns=` naming its columns. Parquet and
Arrow files keep their own columns; `format="glue"` maps those of the Hugging Face `glue`
dataset's files (e.g. `sentence1`, `sentence2`, `label`, `idx`) to the canonical ones.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

_STSB_COLUMNS = (
    "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
)
_MNLI_COLUMNS = (
    "index", "promptid", "pairid", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
    "sentence1_parse", "sentence2_parse", "sentence1", "sentence2",
)

FORMATS = ("auto", "jsonl", "json", "text", "csv", "tsv", "glue", "e2e", "parquet", "arrow", "datasets")

# GLUE layouts, keyed by their header row (lowercased, BOM stripped). Each maps the file's
# columns to canonical ones and says how the file quotes fields: the original GLUE TSVs hold
# unbalanced '"' inside sentences and must be read without quote handling (as GLUE's own
# readers do), while exports of the Hugging Face `glue` dataset quote fields the CSV way.
_GLUE_LAYOUTS: dict[tuple[str, ...], tuple[str, dict[str, str], bool]] = {
    # the GLUE release (gluebenchmark.com / download_glue_data.py)
    ("sentence", "label"): ("SST-2", {"sentence": "text", "label": "label"}, False),
    ("index", "sentence"): ("SST-2 / CoLA test", {"index": "idx", "sentence": "text"}, False),
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
    ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"): (
        "QQP",
        {"id": "idx", "question1": "text", "question2": "text_pair", "is_duplicate": "label"},
        False,
    ),
    ("id", "question1", "question2"): (
        "QQP test",
        {"id": "idx", "question1": "text", "question2": "text_pair"},
        False,
    ),
    (*_STSB_COLUMNS, "score"): (
        "STS-B",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair", "score": "label"},
        False,
    ),
    _STSB_COLUMNS: (
        "STS-B test",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair"},
        False,
    ),
    (*_MNLI_COLUMNS, "label1", "gold_label"): (
        "MNLI train",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair", "gold_label": "label"},
        False,
    ),
    (*_MNLI_COLUMNS, "label1", "label2", "label3", "label4", "label5", "gold_label"): (
        "MNLI dev (matched / mismatched)",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair", "gold_label": "label"},
        False,
    ),
    _MNLI_COLUMNS: (
        "MNLI test (matched / mismatched)",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair"},
        False,
    ),
    ("index", "question", "sentence", "label"): (
        "QNLI",
        {"index": "idx", "question": "text", "sentence": "text_pair", "label": "label"},
        False,
    ),
    ("index", "question", "sentence"): (
        "QNLI test",
        {"index": "idx", "question": "text", "sentence": "text_pair"},
        False,
    ),
    ("index", "sentence1", "sentence2", "label"): (
        "RTE / WNLI",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair", "label": "label"},
        False,
    ),
    ("index", "sentence1", "sentence2"): (
        "RTE / WNLI / AX test",
        {"index": "idx", "sentence1": "text", "sentence2": "text_pair"},
        False,
    ),
    # exports of the Hugging Face `glue` dataset (`to_csv(sep="\t")`), CSV-quoted
    ("sentence", "label", "idx"): (
        "CoLA / SST-2 (Hugging Face export)",
        {"sentence": "text", "label": "label", "idx": "idx"},
        True,
    ),
    ("sentence1", "sentence2", "label", "idx"): (
        "MRPC / STS-B / RTE / WNLI (Hugging Face export)",
        {"sentence1": "text", "sentence2": "text_pair", "label": "label", "idx": "idx"},
        True,
    ),
    ("question1", "question2", "label", "idx"): (
        "QQP (Hugging Face export)",
        {"question1": "text", "question2": "text_pair", "label": "label", "idx": "idx"},
        True,
    ),
    ("premise", "hypothesis", "label", "idx"): (
        "MNLI (Hugging Face export)",
        {"premise": "text", "hypothesis": "text_pair", "label": "label", "idx": "idx"},
        True,
    ),
    ("question", "sentence", "label", "idx"): (
        "QNLI (Hugging Face export)",
        {"question": "text", "sentence": "text_pair", "label": "label", "idx": "idx"},
        True,
    ),
}

# CoLA's train and dev files have no header row: source code, label (0/1), the original
# judgment ("*" for unacceptable, else empty) and the sentence.
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")
_COLA_MAPPING = {"label": "label", "sentence": "text"}

GLUE_TASKS = ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI")
"""The GLUE tasks whose files `load_records` reads as `glue` (every split, MNLI matched and
mismatched; STS-B's `label` is its similarity score, for the regression task)."""

_E2E_HEADERS = {("mr", "ref"), ("mr",)}


def load_records(
    path: str | Path,
    format: str = "auto",
    *,
    text_unit: str = "line",
    delimiter: str | None = None,
    encoding: str = "utf-8",
    limit: int | None = None,
    columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a dataset file (or a `save_to_disk` folder) into a list of dicts, in file order.

    Args:
        path: the file or folder; a trailing `.gz` on a text file is decompressed on the fly.
        format: one of `FORMATS`; `"auto"` detects it (see the module docstring).
        text_unit: for `text` files, `"line"` (one record per non-empty line, trailing
            newline removed) or `"file"` (the whole file is one record).
        delimiter: overrides the field separator of `csv` / `tsv` files.
        encoding: text encoding; a UTF-8 byte-order mark is always dropped.
        limit: keep only the first `limit` records (None keeps all).
        columns: the column names of a CSV/TSV file that has no header row (its first row is
            then data); None reads the names from the first row.

    Returns:
        A non-empty list of dicts. CSV/TSV values are strings exactly as in the file;
        JSON, Parquet and Arrow values keep their types.

    Raises:
        ConfigError: the file is missing or unreadable, the format is unknown or does not
            fit the file (bad JSON line, ragged CSV row, unknown GLUE header, `columns` given
            for a format whose records name their own columns), or the file holds no records.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ConfigError(
            f"Unknown data format {format!r} for {path}. Use --format one of: {', '.join(FORMATS)}."
        )
    if text_unit not in ("line", "file"):
        raise ConfigError(f"--text-unit must be 'line' or 'file', got {text_unit!r}.")
    if columns is not None:
        columns = _check_columns(columns)
    fmt = format
    if fmt == "auto":
        # a header-less file is never a GLUE/E2E layout: the names given are the columns
        ext = _ext(path)
        fmt = ext[1:] if columns is not None and ext in (".csv", ".tsv") else detect_format(path)
    if columns is not None and fmt not in ("csv", "tsv"):
        raise ConfigError(
            f"--columns names the columns of a CSV/TSV file without a header row, but {path} is "
            f"read as {fmt!r}, whose records name their own columns. Drop --columns, or pass "
            f"--format csv / tsv if the file is delimited text."
        )

    if fmt in _COLUMNAR:
        records = _read_columnar(path, fmt, limit)
    elif fmt == "glue" and (path.is_dir() or _ext(path) in (".parquet", ".pq", ".arrow", ".feather")):
        records = _glue_columns(_read_columnar(path, detect_format(path), limit), path)
    else:
        text = _read_text(path, encoding)
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
            records = _parse_delimited(text, path, sep, quoting="auto", columns=columns)
        elif fmt == "glue":
            records = _parse_glue(text, path)
        else:  # e2e
            records = _parse_e2e(text, path)

    if limit is not None:
        records = records[:limit]
    if not records:
        raise ConfigError(
            f"No records in {path} (read as {fmt!r}). Check that the file is not empty, that "
            f"the format is right (pass --format one of {', '.join(FORMATS[1:])}), and that "
            f"limit is positive."
        )
    return records


def read_records(path: str | Path, config: Any) -> list[dict[str, Any]]:
    """`load_records` with a `DataConfig`'s reading settings (format, text_unit, columns).

    Raises:
        ConfigError: as `load_records`.
    """
    return load_records(path, format=config.format, text_unit=config.text_unit, columns=config.columns)


def detect_format(path: str | Path, text: str | None = None) -> str:
    """The format `load_records(path, "auto")` would use.

    A folder is a `datasets` folder (written by `save_to_disk`). Otherwise the extension
    (before any `.gz`) decides; `.tsv` / `.csv` files are further looked at: a GLUE or E2E
    header (or CoLA's header-less rows) makes them `glue` / `e2e`. `text` is the file's
    content, if already read (else the first line is read from disk).

    Raises:
        ConfigError: the extension is not one lorakit reads, a folder is not a `datasets`
            folder, or the file cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        if _is_datasets_folder(path):
            return "datasets"
        raise ConfigError(
            f"Data path {path} is a folder but not one written by datasets' save_to_disk (it has "
            f"no state.json or dataset_dict.json). Pass a data file inside it instead."
        )
    ext = _ext(path)
    if ext in (".jsonl", ".jsonlines", ".ndjson"):
        return "jsonl"
    if ext == ".json":
        return "json"
    if ext in (".txt", ".text"):
        return "text"
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext in (".arrow", ".feather"):
        return "arrow"
    if ext in (".csv", ".tsv"):
        first = (text if text is not None else _first_line(path)).split("\n", 1)[0].rstrip("\r")
        first = first.removeprefix("\ufeff")
        sep = "\t" if ext == ".tsv" else ","
        header = tuple(h.strip().strip('"').lower() for h in first.split(sep))
        if ext == ".tsv" and (header in _GLUE_LAYOUTS or _is_cola_row(first)):
            return "glue"
        if ext == ".csv" and header in _E2E_HEADERS:
            return "e2e"
        return ext[1:]
    raise ConfigError(
        f"Cannot tell the format of {path} from its extension {ext or '(none)'!r}. Rename it "
        f"(.jsonl, .json, .txt, .csv, .tsv, optionally + .gz; .parquet; .arrow) or pass "
        f"--format one of {', '.join(FORMATS[1:])}."
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


def _ext(path: Path) -> str:
    """The extension that decides the format: the last one, or the one before `.gz`."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _first_line(path: Path) -> str:
    """The first line of a (possibly gzipped) text file, without reading the rest."""
    try:
        opener = gzip.open if path.suffix.lower() == ".gz" else open
        with opener(path, "rb") as fh:
            return fh.readline().decode("utf-8", errors="replace")
    except FileNotFoundError as e:
        raise ConfigError(f"Data file {path} does not exist. Check the path.") from e
    except (OSError, EOFError) as e:
        raise ConfigError(f"Cannot read data file {path}: {e}.") from e


def _is_cola_row(line: str) -> bool:
    """Whether a TSV line looks like a row of CoLA's header-less train/dev files."""
    fields = line.rstrip("\r\n").split("\t")
    return (
        len(fields) == len(_COLA_COLUMNS)
        and fields[1] in ("0", "1")
        and len(fields[2]) <= 2
        and bool(fields[0])
        and " " not in fields[0]
    )


def _check_columns(columns: Sequence[str]) -> list[str]:
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",")]
    names = [str(c).strip() for c in columns]
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(
            f"--columns must name every column of the file once, comma-separated (e.g. "
            f"--columns text,label), got {','.join(names) or '(nothing)'!r}."
        )
    return names


# ---------------------------------------------------------------- Parquet, Arrow, datasets

_COLUMNAR = ("parquet", "arrow", "datasets")


def _is_datasets_folder(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _read_columnar(path: Path, fmt: str, limit: int | None) -> list[dict[str, Any]]:
    """Records of a Parquet file, an Arrow file or a `save_to_disk` folder, read with `datasets`.

    Files are streamed (`load_dataset(..., streaming=True)`) and folders memory-mapped: no copy
    of the data is written to the `datasets` cache (only its lock files).
    """
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(
            f"Reading {path} ({fmt}) needs the datasets library: pip install 'lorakit[train]' "
            f"(or pip install datasets)."
        ) from e
    if not path.exists():
        raise ConfigError(f"Data path {path} does not exist. Check the path.")
    if fmt == "datasets" and not (path.is_dir() and _is_datasets_folder(path)):
        raise ConfigError(
            f"{path} is not a folder written by datasets' save_to_disk (no state.json or "
            f"dataset_dict.json in it)."
        )
    try:
        if fmt == "datasets":
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                splits = list(dataset)
                if len(splits) != 1:
                    raise ConfigError(
                        f"{path} holds a DatasetDict with splits {', '.join(splits)}; pass one "
                        f"split's folder, e.g. {path / splits[0]}."
                    )
                dataset = dataset[splits[0]]
            if limit is not None:
                dataset = dataset.select(range(min(limit, len(dataset))))
            return dataset.to_list()
        # the "arrow" builder reads both Arrow IPC streams (datasets' own files) and IPC files
        stream = datasets.load_dataset(fmt, data_files=str(path), split="train", streaming=True)
        if limit is not None:
            stream = stream.take(limit)
        return list(stream)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the Arrow / Parquet readers raise on a bad file
        raise ConfigError(f"Cannot read {path} as {fmt}: {e}. Check the file or pass --format.") from e


# ---------------------------------------------------------------------- text formats


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


def _parse_delimited(
    text: str, path: Path, delimiter: str, quoting: str, columns: Sequence[str] | None = None
) -> list[dict[str, str]]:
    """Rows as dicts keyed by the header, or by `columns` when the file has none.

    quoting: 'csv', 'none' or 'auto' (csv, else none).
    """
    if quoting == "auto":
        try:
            return _parse_delimited(text, path, delimiter, "csv", columns)
        except ConfigError:
            # TSVs such as GLUE's MRPC hold lone '"' characters that CSV quoting would read as
            # the start of a quoted field, swallowing tabs and newlines: read them verbatim.
            return _parse_delimited(text, path, delimiter, "none", columns)
    mode = csv.QUOTE_MINIMAL if quoting == "csv" else csv.QUOTE_NONE
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=mode))
    except csv.Error as e:
        raise ConfigError(f"{path}: not a valid delimited file ({e}).") from e
    rows = [r for r in rows if r]  # blank lines
    if not rows:
        return []
    if columns is None:
        header, first_row = [h.strip() for h in rows[0]], 2
        rows = rows[1:]
        fix = f"Check the delimiter ({delimiter!r}) and quoting."
    else:
        header, first_row = list(columns), 1
        fix = f"Check --columns and the delimiter ({delimiter!r})."
    records = []
    for i, row in enumerate(rows, start=first_row):
        if len(row) != len(header):
            raise ConfigError(
                f"{path}, row {i}: {len(row)} fields where the "
                f"{'header' if columns is None else '--columns list'} has {len(header)} "
                f"({', '.join(header)}). {fix}"
            )
        records.append(dict(zip(header, row, strict=True)))
    return records


def _parse_glue(text: str, path: Path) -> list[dict[str, str]]:
    first = text.split("\n", 1)[0].rstrip("\r")
    header = tuple(h.strip().lower() for h in first.split("\t"))
    if header in _GLUE_LAYOUTS:
        _, mapping, quoted = _GLUE_LAYOUTS[header]
        rows = _parse_delimited(text, path, "\t", "csv" if quoted else "none")
    elif _is_cola_row(first):
        mapping = _COLA_MAPPING
        rows = _parse_delimited(text, path, "\t", "none", columns=_COLA_COLUMNS)
    else:
        known = "; ".join(f"{name}: {' | '.join(h)}" for h, (name, _, _) in _GLUE_LAYOUTS.items())
        raise ConfigError(
            f"{path}: header {' | '.join(header)!r} is not a GLUE layout lorakit knows ({known}; "
            f"CoLA train/dev: no header, {' | '.join(_COLA_COLUMNS)}). Read it with --format tsv "
            f"(and --columns if it has no header row) and name the columns with --text-column, "
            f"--text-pair-column and --label-column instead."
        )
    return [{mapping[k.lower()]: v for k, v in row.items() if k.lower() in mapping} for row in rows]


def _glue_columns(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Records of a Hugging Face `glue` Parquet / Arrow file renamed to the canonical columns."""
    if not records:
        return records
    header = tuple(k.lower() for k in records[0])
    layout = _GLUE_LAYOUTS.get(header)
    if layout is None:
        hf = "; ".join(f"{name}: {', '.join(h)}" for h, (name, _, quoted) in _GLUE_LAYOUTS.items() if quoted)
        raise ConfigError(
            f"{path}: columns {', '.join(records[0])} are not a Hugging Face GLUE layout ({hf}). "
            f"Drop --format glue to keep the file's own columns, and name them with --text-column, "
            f"--text-pair-column and --label-column."
        )
    mapping = layout[1]
    return [{mapping[k.lower()]: v for k, v in r.items() if k.lower() in mapping} for r in records]


def _parse_e2e(text: str, path: Path) -> list[dict[str, str]]:
    rows = _parse_delimited(text, path, ",", "csv")
    if rows and tuple(k.lower() for k in rows[0]) not in _E2E_HEADERS:
        raise ConfigError(
            f"{path}: an E2E file needs the header 'mr,ref' (or 'MR' alone), found "
            f"{','.join(rows[0])!r}. Read it with --format csv to keep its own columns."
        )
    out = []
    for row in rows:
        low = {k.lower(): v for k, v in row.items()}
        rec = {"prompt": low["mr"]}
        if "ref" in low:
            rec["completion"] = low["ref"]
        out.append(rec)
    return out
