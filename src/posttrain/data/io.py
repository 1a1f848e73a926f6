"""Reading rows from jsonl / json / parquet / csv files, `save_to_disk` directories, hub names and
built-in tasks, each row tagged with where it came from so errors can name the file and line."""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.runtime.files import atomic_write_text
from posttrain.tasks import get_task


class DataError(ValueError):
    """Bad input data; the message names the file, the row (line for jsonl/csv) and the column."""


@dataclass(frozen=True)
class Rows:
    """Rows plus, for each, a human location such as ``train.jsonl:12``."""

    rows: list[dict[str, Any]]
    where: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: list[int]) -> "Rows":
        return Rows([self.rows[i] for i in idx], [self.where[i] for i in idx], self.source)


def heldout_split(path: str, split: str) -> str:
    """The split held-out data is read from: a builtin task's test split (its train split is what the recipes
    train on), else the configured one."""
    return "test" if path.startswith("builtin:") else split


def read_rows(path: str, split: str = "train", *, num_examples: int = 0, seed: int = 0) -> Rows:
    """Rows from ``path``; for ``builtin:<task>`` the task generates them (split train/test)."""
    if not path:
        raise DataError("data.path is empty: give a jsonl/json/parquet/csv file, a dataset directory or builtin:<task>")
    if path.startswith("builtin:"):
        return _builtin(path, split, num_examples, seed)
    p = Path(path)
    if p.is_dir():
        return _dataset_dir(p, split)
    if p.exists() and not p.is_file():
        raise DataError(f"{p}: not a regular file (a device, pipe or socket); give a data file or a dataset directory")
    if p.is_file():
        suffix = p.suffix.lower()
        reader = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}.get(suffix)
        if reader is None:
            raise DataError(
                f"{p}: unsupported file type {suffix!r} (jsonl, json, parquet, csv, or a dataset directory)"
            )
        rows = reader(p)
    elif "/" in path and not path.startswith((".", "/")) and not p.suffix:
        rows = _hub(path, split)
    else:
        raise DataError(missing(path))
    if len(rows) == 0:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def check_source(path: str, split: str = "train") -> str | None:
    """What is wrong with ``path`` as a data source, without reading it all (None: nothing found).
    Used to report every problem of a run or pipeline before anything starts."""
    if not path:
        return "empty: give a jsonl/json/parquet/csv file, a dataset directory or builtin:<task>"
    if path.startswith("builtin:"):
        try:
            _builtin(path, split, 1, 0)
        except (DataError, ValueError) as e:
            return str(e)
        return None
    p = Path(path)
    if p.is_dir():
        saved = (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()
        return None if saved else f"{p} is a directory but not a dataset saved with save_to_disk"
    if p.exists() and not p.is_file():
        return f"{p} is not a regular file"
    if p.is_file():
        if p.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv"):
            return f"{p}: unsupported file type {p.suffix!r} (jsonl, json, parquet, csv, or a dataset directory)"
        try:
            with p.open("rb"):
                pass
        except OSError as e:
            return f"{p}: cannot read: {e.strerror or e}"
        return None
    if "/" in path and not path.startswith((".", "/")) and not p.suffix:
        return None  # a hub dataset name: only loading it can tell
    return missing(path)


def missing(path: str) -> str:
    """A data path that is not there, and where it was looked for (relative paths: the working directory,
    as every path in a config, not the config file's directory)."""
    where = "" if Path(path).is_absolute() else f" (a relative path is read from the working directory, {Path.cwd()})"
    return f"{path}: no such file or directory{where}"


def _builtin(path: str, split: str, n: int, seed: int) -> Rows:
    spec, _, query = path[len("builtin:") :].partition("?")
    name, _, kind = spec.partition("/")
    options = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        try:
            options[key] = float(value) if "." in value else int(value)
        except ValueError:
            raise DataError(f"{path}: option {key}={value!r} is not a number") from None
    try:
        task = get_task(name, **options)
    except TypeError as e:
        raise DataError(f"{path}: {e}") from None
    n = n or (2000 if split == "train" else 200)
    try:
        if kind == "pretrain":
            rows = task.pretrain_text(n, seed=seed)
        elif kind == "sft" and hasattr(task, "sft_rows"):  # a task whose SFT data differs (tools: conversations)
            rows = task.sft_rows(n, seed=seed)
        elif kind in ("", "sft"):
            rows = task.rows(n, split="test" if split == "test" else "train", seed=seed)
        else:
            rows = None
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    if rows is None:
        raise DataError(
            f"{path}: unknown builtin view {kind!r} (use builtin:{name} or builtin:{name}/pretrain, "
            f"options as builtin:{name}?max_terms=3)"
        )
    return Rows(rows, [f"{path}[{i}]" for i in range(len(rows))], path)


def _text(p: Path) -> str:
    """The file as UTF-8 text (a leading BOM is dropped); an unreadable or undecodable file is a
    DataError naming the line and byte."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{p}: the file is UTF-16 encoded; posttrain reads UTF-8: re-save it as UTF-8")
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        byte = skip + e.start
        line = data.count(b"\n", 0, byte) + 1
        raise DataError(
            f"{p}:{line}: not valid UTF-8 (byte {byte} of the file: {data[byte : byte + 4]!r}); posttrain "
            f"reads text data as UTF-8: re-save the file as UTF-8"
        ) from None


def _jsonl(p: Path) -> Rows:
    rows, where = [], []
    for lineno, line in enumerate(_text(p).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{lineno}: invalid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{p}:{lineno}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{p}:{lineno}")
    return Rows(rows, where, str(p))


def _json(p: Path) -> Rows:
    try:
        data = json.loads(_text(p))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f'{p}: expected a list of objects (or {{"data": [...]}})')
    return Rows(list(data), [f"{p}[{i}]" for i in range(len(data))], str(p))


def _parquet(p: Path) -> Rows:
    import pyarrow as pa  # noqa: PLC0415 - pyarrow loads for parquet files only
    import pyarrow.parquet as pq  # noqa: PLC0415 - pyarrow loads for parquet files only

    try:
        rows = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{p}: not a readable parquet file: {e}") from None
    return Rows(rows, [f"{p}[row {i}]" for i in range(len(rows))], str(p))


def _csv(p: Path) -> Rows:
    reader = csv.DictReader(io.StringIO(_text(p), newline=""))
    rows, where = [], []
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{p}:{reader.line_num}: more fields than the header has columns")
            rows.append(dict(row))
            where.append(f"{p}:{reader.line_num}")
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: invalid CSV: {e}") from None
    return Rows(rows, where, str(p))


def _from_dataset(ds: Any, label: str) -> Rows:
    rows = ds.to_list()
    return Rows(rows, [f"{label}[row {i}]" for i in range(len(rows))], label)


def _dataset_dir(p: Path, split: str) -> Rows:
    import datasets  # noqa: PLC0415 - datasets costs ~1 s to import; only dataset directories need it

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise DataError(f"{p}: not a dataset saved with save_to_disk ({e})") from None
    except Exception as e:  # noqa: BLE001 - arrow / json errors of a damaged dataset directory
        raise DataError(f"{p}: cannot load this save_to_disk directory ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{p}: no split {split!r} (has {', '.join(ds)})")
        ds = ds[split]
    return _from_dataset(ds, f"{p}:{split}")


def _hub(name: str, split: str) -> Rows:
    import datasets  # noqa: PLC0415 - datasets costs ~1 s to import; only dataset directories need it

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many types; re-raised with the name
        raise DataError(f"{name}: could not load from the dataset hub ({type(e).__name__}: {e})") from e
    return _from_dataset(ds, f"{name}:{split}")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Atomic: the file appears complete or not at all."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
