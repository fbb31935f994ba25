"""``load_dataset(spec, fmt)``: the one call through which every stage gets its data.

Order of work (each step names the DataSpec field it serves):

1. read rows: the ``arith`` generator or the built-in ``redteam`` prompts; a named source (``gsm8k``, ``hh``, ``math-shepherd``, ``prm800k``)
   from ``path`` or its Hub id; a local file (.jsonl/.json/.parquet/.csv, optionally .gz); a
   ``datasets.save_to_disk`` folder (a Dataset, or a DatasetDict read at ``split``); else a Hub id (with
   ``split``, and optionally ``subset`` and ``data_files``).
2. rename ``columns`` (ours -> theirs) to our names; pick the adapter (``adapter``, ``auto`` detects it
   from the columns and first row).
3. visit rows in a seeded random order if ``shuffle``, convert each, view it as ``fmt`` and check it,
   stopping once ``limit`` rows are kept: shuffling happens before the limit, and a 1M-row Hub dataset
   with ``limit: 500`` converts only ~500 rows.

``.jsonl`` files are read with the json module rather than datasets' loader: it is faster, writes no cache,
and a bad line can be reported by number. ``datasets`` itself is imported only when a Dataset is built.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from alignkit.core.config import DataSpec
from alignkit.data import arith, codetasks, redteam
from alignkit.data.adapters import ADAPTERS, Adapter, SkipRow, adapter_params, detect
from alignkit.data.formats import (
    COLUMN_TYPES, FORMATS, TYPED_FORMATS, check_format, features, missing_columns, to_format,
)
from alignkit.core.errors import DataError

logger = logging.getLogger(__name__)

_CHUNK = 1024  # rows fetched from a datasets.Dataset at a time
_ARITH_FORMATS = ("sft", "problems", "text", "stepwise", "preference", "prompts")


MAX_ROW_CHARS = 4 << 20  # one example this long is truncated to max_length anyway; refused, not half-loaded


def read_jsonl(path: Path, head: int | None = None) -> list[dict[str, Any]]:
    """The rows of a .jsonl (or .jsonl.gz) file (only the first ``head`` if given): the one JSONL reader; each
    bad line is one DataError."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file (.jsonl, .json, .parquet or .csv)")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported on its own line
        for number, line in _numbered_lines(f, path):
            if not line.strip():
                continue
            if len(line) > MAX_ROW_CHARS:
                raise DataError(f"{path}: line {number} is {len(line) / 2**20:.1f}M characters, over the "
                                f"{MAX_ROW_CHARS >> 20}M a row may have; split or shorten it")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg}); fix or delete it") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
            if head is not None and len(rows) >= head:
                break
    return rows


def _numbered_lines(f, path: Path):
    """``(number, text)`` per line of a binary file; bytes that are not UTF-8, or a corrupt .gz, are one
    DataError naming the line, not a traceback."""
    number = 0
    try:
        for number, raw in enumerate(f, start=1):
            yield number, raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: line {number} is not UTF-8 text (byte {err.object[err.start]:#04x}); "
                        "re-save the file as UTF-8") from None
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise DataError(f"{path}: unreadable after line {number} ({type(err).__name__}: {err})") from None


def read_file(path: str | Path) -> Any:
    """Rows of a local .jsonl/.json/.parquet/.csv file (each optionally .gz): a list of dicts or a Dataset."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file (.jsonl, .json, .parquet or .csv) nor a "
                        "datasets.save_to_disk folder")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind == ".jsonl":
        return read_jsonl(path)
    builders = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if kind not in builders:
        raise DataError(f"{path}: unsupported file type; use .jsonl, .json, .parquet or .csv (or their .gz)")
    import datasets

    try:
        return datasets.load_dataset(builders[kind], data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: could not read as {kind[1:]} ({type(err).__name__}: {err})") from None


def read_hub(name: str, config: str | None, split: str, data_files: Any = None) -> Any:
    """A Hub dataset split (``config``: its subset name); DataError (likely offline) if it cannot be loaded."""
    import datasets

    kwargs = {"data_files": data_files} if data_files is not None else {}
    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except Exception as err:  # network, auth, missing split: all mean "use a local file"
        subset = f", subset {config!r}" if config else ""
        raise DataError(
            f"could not load Hub dataset {name!r} (split {split!r}{subset}): {type(err).__name__}: {err}. "
            "Offline? Pass a local file (`path:` for named sources, or a file path as `source:`)."
        ) from None


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def read_saved(path: Path, split: str) -> Any:
    """A ``save_to_disk`` folder: the Dataset itself, or split ``split`` of a DatasetDict."""
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or partly copied folder
        raise DataError(f"{path}: could not read the saved dataset ({type(err).__name__}: {err})") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: saved DatasetDict has no split {split!r}; its splits are {sorted(saved)} "
                            "(set `split:`)")
        return saved[split]
    return saved


def _columns(table: Any) -> list[str]:
    return list(table[0].keys()) if isinstance(table, list) else list(table.column_names)


def _take(table: Any, indices: list[int]) -> list[dict[str, Any]]:
    if isinstance(table, list):
        return [table[i] for i in indices]
    batch = table[indices]  # dict of column -> list
    return [dict(zip(batch, values)) for values in zip(*batch.values())]


def _rename(row: dict[str, Any], theirs_to_ours: dict[str, str]) -> dict[str, Any]:
    # A column of theirs that carries one of our names but is not the mapped one is dropped, so that
    # {prompt: question} wins over a stray `prompt` column.
    shadowed = set(theirs_to_ours.values())
    out = {k: v for k, v in row.items() if k not in shadowed and k not in theirs_to_ours}
    out.update({ours: row[theirs] for theirs, ours in theirs_to_ours.items()})
    return out


def _order(n: int, spec: DataSpec) -> list[int]:
    order = list(range(n))
    if spec.shuffle:
        random.Random(spec.seed).shuffle(order)
    return order


def _read_source(spec: DataSpec) -> tuple[Any, str, str | None]:
    """(rows, a name for messages, adapter forced by a named source or None)."""
    named = ADAPTERS.get(spec.source)
    if named is not None:
        if spec.path is not None:
            return _read_local_or_hub(spec.path, spec.split, spec), spec.path, named.name
        if named.hub is None:
            raise DataError(f"source {spec.source!r} is not on the Hub: pass `path:` to a local file")
        return read_hub(named.hub[0], spec.subset or named.hub[1], spec.split, spec.data_files), named.hub[0], \
            named.name
    if spec.path is not None:
        raise DataError(f"`path:` is only for named sources {sorted(ADAPTERS)}; put the file in `source:`")
    return _read_local_or_hub(spec.source, spec.split, spec), spec.source, None


def _read_local_or_hub(location: str, split: str, spec: DataSpec | None = None) -> Any:
    if is_saved_dataset(Path(location)):
        return read_saved(Path(location), split)
    if Path(location).exists():
        return read_file(location)
    if Path(location).suffix in (".jsonl", ".json", ".parquet", ".csv", ".gz"):
        raise DataError(f"file not found: {location}")
    return read_hub(location, spec.subset if spec else None, split, spec.data_files if spec else None)


def _pick_adapter(spec: DataSpec, forced: str | None, columns: list[str], first: dict[str, Any]) -> str:
    if forced is not None and spec.adapter not in ("auto", forced):
        raise DataError(f"source {spec.source!r} is read by adapter {forced!r}, not {spec.adapter!r}")
    if spec.adapter == "arith":
        raise DataError("adapter 'arith' only reads `source: arith` (the built-in generator)")
    return forced or (detect(columns, first) if spec.adapter == "auto" else spec.adapter)


def _check_columns(adapter: Adapter | None, fmt: str, columns: list[str], where: str) -> None:
    if adapter is None:
        missing = missing_columns(columns, fmt)
        if missing:
            raise DataError(
                f"{where}: format {fmt!r} needs columns {list(FORMATS[fmt][0])}; missing {missing}, "
                f"found {columns}. Map yours with `columns:` (e.g. {{{missing[0]}: your_column}})."
            )
        return
    if fmt not in adapter.formats:
        raise DataError(
            f"{where}: adapter {adapter.name!r} gives formats {list(adapter.formats)}, not {fmt!r}"
        )
    if not any(set(need) <= set(columns) for need in adapter.needs):
        wanted = " or ".join(str(list(n)) for n in adapter.needs)
        raise DataError(f"{where}: adapter {adapter.name!r} needs columns {wanted}; found {columns}")


def _convert_row(
    raw: dict[str, Any], rename: dict[str, str], adapter: Adapter | None, params: Any, fmt: str, where: str
) -> list[dict[str, Any]]:
    """One raw row -> its records viewed as ``fmt`` (DataError prefixed with ``where``; SkipRow passes)."""
    try:
        row = _rename(raw, rename)
        records = adapter.convert(row, params) if adapter else [row]
        return [to_format(r, fmt, where) for r in records]
    except KeyError as err:  # jsonl rows need not share the first row's keys
        raise DataError(f"{where}: missing column {err}") from None
    except DataError as err:
        raise (err if str(err).startswith(where) else DataError(f"{where}: {err}")) from None


def _convert(table: Any, spec: DataSpec, fmt: str, where: str, forced: str | None) -> list[dict[str, Any]]:
    """Steps 2-3 of the module docstring over a file or Hub table."""
    n = len(table)
    if n == 0:
        raise DataError(f"{where}: no rows")
    rename = {theirs: ours for ours, theirs in spec.columns.items()}
    raw_columns = _columns(table)
    unknown = [theirs for theirs in rename if theirs not in raw_columns]
    if unknown:
        raise DataError(f"{where}: `columns:` maps to {unknown}, not among its columns {raw_columns}")
    first = _rename(_take(table, [0])[0], rename)
    adapter = ADAPTERS.get(_pick_adapter(spec, forced, list(first), first))
    _check_columns(adapter, fmt, list(first), where)
    if adapter is None and spec.params:
        raise DataError(f"{where}: `params:` is only for arith and adapters, got {sorted(spec.params)}")
    params = adapter_params(adapter, spec.params) if adapter else None
    rows: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    order = _order(n, spec)
    limit = spec.skip + spec.limit if spec.limit is not None else float("inf")
    for start in range(0, n, _CHUNK):
        if len(rows) >= limit:
            break
        chunk = order[start: start + _CHUNK]
        for index, raw in zip(chunk, _take(table, chunk)):
            try:
                rows += _convert_row(raw, rename, adapter, params, fmt, f"row {index} of {where}")
            except SkipRow as why:
                skipped[str(why)] += 1
            if len(rows) >= limit:
                break
    if skipped:
        logger.warning("%s: skipped %d unusable rows (%s)", where, sum(skipped.values()),
                       "; ".join(f"{count} x {reason}" for reason, count in skipped.most_common()))
    return _window(rows, spec)


def _window(items: list, spec: DataSpec) -> list:
    """``items[skip : skip + limit]``: the rows a spec's ``skip`` and ``limit`` leave (after any shuffle)."""
    return items[spec.skip: None if spec.limit is None else spec.skip + spec.limit]


def _arith_rows(spec: DataSpec, fmt: str) -> list[dict[str, Any]]:
    if spec.adapter not in ("auto", "arith"):
        raise DataError(f"source 'arith' is the built-in generator; adapter {spec.adapter!r} cannot read it")
    if fmt not in _ARITH_FORMATS:
        raise DataError(f"arith gives formats {list(_ARITH_FORMATS)}, not {fmt!r}")
    if spec.columns:
        raise DataError("arith: `columns:` does not apply to the built-in generator")
    params = arith.parse_params(spec.params, seed=spec.seed)
    records = arith.generate(params)
    order = _window(_order(len(records), spec), spec)
    return [arith.view(records[i], fmt, params, index=i) for i in order]


def _redteam_rows(spec: DataSpec, fmt: str) -> list[dict[str, Any]]:
    if fmt != "prompts":
        raise DataError(f"source 'redteam' is a list of prompts (format 'prompts'), not {fmt!r}")
    if spec.adapter != "auto" or spec.columns or spec.params or spec.path:
        raise DataError("source 'redteam' is the built-in prompt list: it takes no adapter, columns, params or path")
    records = redteam.rows()
    return [records[i] for i in _window(_order(len(records), spec), spec)]


def _code_rows(spec: DataSpec, fmt: str) -> list[dict[str, Any]]:
    if fmt not in ("code", "prompts"):
        raise DataError(f"source 'code' is a set of function tasks with tests (format 'code'), not {fmt!r}")
    if spec.adapter != "auto" or spec.columns or spec.params or spec.path:
        raise DataError("source 'code' is the built-in task set: it takes no adapter, columns, params or path")
    records = codetasks.rows()
    return [{"prompt": records[i]["prompt"]} if fmt == "prompts" else records[i]
            for i in _window(_order(len(records), spec), spec)]


def load_dataset(spec: DataSpec, fmt: str):
    """Load ``spec`` as a ``datasets.Dataset`` in format ``fmt`` (see :mod:`alignkit.data.formats`).

    Raises DataError for: an unknown format, a source that cannot be read, missing columns (naming the
    columns needed and found), a malformed row (naming its index), and an empty result.
    """
    check_format(fmt)
    rows = _mixture_rows(spec, fmt) if spec.mixture is not None else _rows(spec, fmt)
    return _to_dataset(rows, fmt)


def _rows(spec: DataSpec, fmt: str) -> list[dict[str, Any]]:
    """The checked rows of one (non-mixture) spec."""
    if spec.source == "arith":
        rows, where = _arith_rows(spec, fmt), "arith"
    elif spec.source == "redteam":
        rows, where = _redteam_rows(spec, fmt), "redteam"
    elif spec.source == "code":
        rows, where = _code_rows(spec, fmt), "code"
    else:
        table, where, forced = _read_source(spec)
        rows = _convert(table, spec, fmt, where, forced)
    if not rows:
        raise DataError(f"{where}: no rows left for format {fmt!r} (after skipping unusable rows)")
    return rows


def _mixture_rows(spec: DataSpec, fmt: str) -> list[dict[str, Any]]:
    """A mixture: each part's rows used ``weight`` times (:func:`weighted_pool`), pooled in order, then shuffled
    (if ``shuffle``) and cut at ``skip``/``limit``."""
    parts = [(_mixture_rows(part, fmt) if part.mixture is not None else _rows(part, fmt), part.weight,
              f"mixture part {index} ({part.source})") for index, part in enumerate(spec.mixture)]
    pooled = weighted_pool(parts, seed=spec.seed)
    return _window([pooled[i] for i in _order(len(pooled), spec)], spec)


def weighted_pool(parts: list[tuple[list[dict[str, Any]], float, str]], *, seed: int) -> list[dict[str, Any]]:
    """Rows of ``(rows, weight, name)`` parts pooled in order, each part's rows used ``weight`` times: the whole
    part ``int(weight)`` times plus a sample (seeded by ``seed`` and the part's position) for the fraction. The one
    weighting of data mixtures and of the RL stages' environments. DataError if a weight keeps no row.

    >>> [r["x"] for r in weighted_pool([([{"x": 1}, {"x": 2}], 2.0, "a"), ([{"x": 3}, {"x": 4}], 0.5, "b")], seed=0)]
    [1, 2, 1, 2, 3]
    """
    pooled: list[dict[str, Any]] = []
    for index, (rows, weight, name) in enumerate(parts):
        whole, fraction = divmod(weight, 1.0)
        extra = random.Random(seed * 1_000_003 + index).sample(rows, round(fraction * len(rows)))
        used = rows * int(whole) + extra
        if not used:
            raise DataError(f"{name}: weight {weight} keeps none of its {len(rows)} rows")
        pooled += used
    return pooled


def _to_dataset(rows: list[dict[str, Any]], fmt: str):
    data = _column_lists(rows, fmt)
    return _from_dict(data, None if "messages" in data else features(fmt, list(data)))


def check_rows(rows: list[dict[str, Any]], fmt: str) -> None:
    """DataError wherever :func:`_to_dataset` would raise one, building the Dataset only when in doubt.

    A column whose values are all strings, or all lists of one plain type (strings, booleans, int64 integers,
    floats, ``{role, content}`` string messages), of the type the format fixes if it fixes one, always makes a
    Dataset; ``datasets`` takes seconds to import, which ``--dry-run`` does not spend on such data (plain JSONL,
    the built-in generators).
    """
    data = _column_lists(rows, fmt)
    fixed = fmt in TYPED_FORMATS and "messages" not in data
    for column, values in data.items():
        found = _column_type(values)
        wanted = COLUMN_TYPES[column] if fixed else found
        if found is None or not (found == wanted or (found == [] and isinstance(wanted, list))):
            _to_dataset(rows, fmt)  # raises the DataError, or shows that Arrow takes the column after all
            return


def _column_lists(rows: list[dict[str, Any]], fmt: str) -> dict[str, list[Any]]:
    """``rows`` as column -> values for a Dataset of format ``fmt``; DataError for rows of mixed forms."""
    if fmt == "sft" and any("messages" in r for r in rows):
        if not all("messages" in r for r in rows):
            raise DataError("sft rows mix `messages` conversations with prompt/completion rows; use one form")
        return {"messages": [r["messages"] for r in rows]}
    columns = list(FORMATS[fmt][0]) + [c for c in FORMATS[fmt][1] if any(c in r for r in rows)]
    if any(c not in r for r in rows for c in columns):
        optional = [c for c in columns if c in FORMATS[fmt][1]]
        raise DataError(f"optional columns {optional} are present in some rows but not all (format {fmt!r})")
    return {c: [r[c] for r in rows] for c in columns}


def _column_type(values: list[Any]) -> str | list[str] | None:
    """``"string"`` when every value is a string; ``[t]`` when every value is a list of items of plain type ``t``
    (``[]``: all lists empty); None for anything else (mixed, nested, other types).

    >>> _column_type(["a", "b"]), _column_type([[], ["a"]]), _column_type([[1], [2**63]]), _column_type([[1], [True]])
    ('string', ['string'], None, None)
    >>> _column_type([[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi", "name": "x"}]])
    """
    if all(_item_type(value) == "string" for value in values):
        return "string"
    if not all(isinstance(value, list) for value in values):
        return None
    kinds = {_item_type(item) for value in values for item in value}
    return None if len(kinds) > 1 or None in kinds else list(kinds)


def _item_type(item: Any) -> str | None:
    if isinstance(item, str):  # a lone surrogate (JSON "\ud800") is valid Python but not UTF-8: Arrow refuses it
        return "string" if item.isascii() or _utf8(item) else None
    if isinstance(item, bool):
        return "bool"
    if isinstance(item, int):
        return "int64" if -2**63 <= item < 2**63 else None
    if isinstance(item, float):
        return "float64"
    if isinstance(item, dict):  # a message: exactly role and content, both strings
        plain = item.keys() == {"role", "content"} and all(_item_type(v) == "string" for v in item.values())
        return "message" if plain else None
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_dict(data: dict[str, list[Any]], features: Any = None):
    from datasets import Dataset

    try:
        return Dataset.from_dict(data, features=features)
    except (TypeError, ValueError) as err:  # pyarrow's ArrowInvalid/ArrowTypeError are ValueError/TypeError
        raise DataError(f"rows disagree on a column's type (e.g. string prompts next to message-list prompts, "
                        f"perhaps across a mixture's parts): {type(err).__name__}: {str(err)[:200]}") from None


def split_eval(ds: Any, eval_size: int | float | None, seed: int):
    """Hold out ``eval_size`` rows (an int count, or a float fraction in (0, 1)) -> (train, eval or None).

    The held-out rows are a seeded random sample; at least one row stays on each side.
    """
    if eval_size is None or eval_size == 0:
        return ds, None
    n = len(ds)
    if isinstance(eval_size, bool) or not isinstance(eval_size, (int, float)):
        raise DataError(f"eval_size must be a row count or a fraction, got {eval_size!r}")
    if isinstance(eval_size, float):
        if not 0.0 < eval_size < 1.0:
            raise DataError(f"eval_size as a fraction must be in (0, 1), got {eval_size}")
        n_eval = max(1, round(n * eval_size))
    else:
        n_eval = eval_size
    if not 1 <= n_eval < n:
        raise DataError(f"eval_size {eval_size!r} leaves no training rows out of {n}; use fewer than {n}")
    split = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
