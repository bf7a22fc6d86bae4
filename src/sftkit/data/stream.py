"""The rows of one source read lazily, normalised on the fly, with a position that a checkpoint can save.

A source is a list of shards (one file, the files of a folder, or a hub dataset) read in order. The
position is (pass, shard, cursor): the cursor says where the next row of the shard starts, so a resume
opens that shard there instead of reading the source again from its start:

    file type                  cursor                    cost of a resume            memory while reading
    .jsonl, .json (lines)      byte offset + line         O(1): one seek             one line
    .csv                       byte offset + line         O(1) (+ the header line)   one record
    .parquet                   row                        one row group              one Arrow batch
    .json (one JSON list)      row                        parse of the whole file    the whole file
    hub ids, other folders     `datasets` stream state    reads the current shard    one Arrow batch
                                                          up to the row (datasets)

Building a stream also reads its first 100 rows (the format comes from their columns): a resume costs
that and the seek, whatever the position.

Rows come out exactly as `load_source` gives them (`messages`, `tools`, `text`, `source_row`), checked
with the same helpers and the same error wording; only the read differs. One difference: a CSV cell is
read as text (an empty cell as missing), where the offline reader lets pandas guess types and missing
values (there a column of `42`s is numbers, which no format accepts, and `NA` is missing).

    stream = SourceStream(spec, "chat", system_prompt=None, skip_bad_rows=False)
    for row in stream: ...               # one pass, from the current position
    state = stream.state_dict()          # JSON-serialisable
    fresh = SourceStream(spec, "chat", None, False); fresh.load_state_dict(state)  # continues there
"""

from __future__ import annotations

import copy
import csv
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from sftkit.config import DatasetSpec
from sftkit.data.formats import (
    FILE_BUILDERS,
    NORMALISED_FEATURES,
    DataError,
    LoadedSource,
    bad_row_error,
    check_json_layout,
    count_skipped,
    decode_line,
    detect_format,
    empty_file_error,
    list_item_error,
    normalise_row,
    parse_json_file,
    parse_json_line,
    source_kind,
    starts_with,
)

Cursor = dict[str, Any] | None  # where the next row of a shard starts; None: at its beginning
PARQUET_BATCH_ROWS = 1024
DETECTION_ROWS = 100  # the format comes from the columns of the first rows (a JSON row may leave optional ones out)


@dataclass(frozen=True)
class Shard:
    """One file of a source (or the whole source, for `datasets` streams), and how to read it."""

    name: str  # the file (or the hub id), for error messages and for checking a saved state
    reader: str  # "lines", "json_list", "csv", "parquet" or "datasets"


@dataclass
class Position:
    pass_number: int = 0
    shard: int = 0
    cursor: Cursor = None
    shard_row: int = 0  # rows read from the current shard (errors name the row within its file)
    source_row: int = 0  # rows read from the source in this pass: the next row's `source_row`


@dataclass
class SourceStream:
    """The normalised rows of one source, read lazily (see the module docstring), with a saveable position."""

    spec: DatasetSpec
    name: str
    system_prompt: str | None
    skip_bad_rows: bool
    format: str = field(init=False)
    skipped: dict[str, int] = field(init=False, default_factory=dict)  # bad rows skipped, by reason, all passes
    rows_read: int = field(init=False, default=0)  # rows read (kept or skipped), all passes
    rows_yielded: int = field(init=False, default=0)  # rows given (not skipped), all passes
    _shards: list[Shard] = field(init=False, repr=False)
    _position: Position = field(init=False, default_factory=Position, repr=False)

    def __post_init__(self) -> None:
        self._shards = _resolve_shards(self.spec)
        columns: dict[str, None] = {}  # in order of appearance
        head = (row for shard in self._shards for row, _ in _rows(self.spec, shard, None))
        for row in islice(head, DETECTION_ROWS):
            columns.update(dict.fromkeys(row))
        if not columns:
            only = Path(self._shards[0].name)
            if len(self._shards) == 1 and self._shards[0].reader in ("lines", "csv") and not only.read_bytes().strip():
                raise empty_file_error(only)  # blank lines only (or no CSV header): nothing was written to it
            raise DataError(f"{self.spec.path}: the dataset is empty")
        self.format = detect_format(list(columns), self.spec)

    @property
    def path(self) -> str:
        return self.spec.path

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """From the current position to the end of the source (one pass). A bad row raises DataError naming
        its file and row, unless `skip_bad_rows`: then it is counted in `skipped` by reason."""
        return self.rows()

    def rows(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Like iterating the stream, but stops once `limit` rows (kept or skipped) have been read."""
        position, columns, read = self._position, dict(self.spec.columns), 0
        while position.shard < len(self._shards):
            shard = self._shards[position.shard]
            for row, cursor in _rows(self.spec, shard, position.cursor):
                normalised = normalise_row(row, position.source_row, self.format, columns, self.system_prompt)
                position.cursor = cursor
                position.shard_row += 1
                position.source_row += 1
                self.rows_read += 1
                read += 1
                error = normalised.pop("error")
                if not error:
                    self.rows_yielded += 1
                    yield normalised
                elif not self.skip_bad_rows:
                    raise bad_row_error(self._where(shard), self._row_number(shard, position), error)
                else:
                    count_skipped(self.skipped, error)
                if limit is not None and read >= limit:
                    return
            position.shard, position.cursor, position.shard_row = position.shard + 1, None, 0
        if self.rows_yielded == 0:
            raise DataError(
                f"{self.spec.path}: no usable rows left after skipping {sum(self.skipped.values())} "
                f"bad rows {self.skipped}"
            )

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: pass number, (shard, cursor) position, rows read, rows skipped."""
        return {
            "shards": [shard.name for shard in self._shards],
            "format": self.format,
            "position": copy.deepcopy(asdict(self._position)),
            "rows_read": self.rows_read,
            "rows_yielded": self.rows_yielded,
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next row yielded is the one that would have come next when `state` was saved."""
        shards = [shard.name for shard in self._shards]
        if state["shards"] != shards or state["format"] != self.format:
            raise DataError(
                f"{self.spec.path}: the source changed since its position was saved (shards "
                f"{state['shards']}, format {state['format']}; now {shards}, {self.format}); resume "
                "with the data the run started with, or start a new run"
            )
        self._position = Position(**copy.deepcopy(state["position"]))
        self.rows_read, self.rows_yielded = state["rows_read"], state["rows_yielded"]
        self.skipped = dict(state["skipped"])

    def restart(self) -> None:
        """The next pass (for `on_exhausted: repeat`): from row 0 again."""
        self._position = Position(pass_number=self._position.pass_number + 1)

    @property
    def pass_number(self) -> int:
        return self._position.pass_number

    def _where(self, shard: Shard) -> str:
        return self.spec.path if len(self._shards) == 1 else shard.name

    def _row_number(self, shard: Shard, position: Position) -> int:
        """1-based row of the bad row: within its file for a folder, within the source otherwise."""
        return position.source_row if len(self._shards) == 1 else position.shard_row


def sample_source(spec: DatasetSpec, system_prompt: str | None, skip_bad_rows: bool, rows: int) -> LoadedSource:
    """The first `rows` rows of a source, normalised, as `load_source` would give them: what `data inspect`
    reads of a streamed source, so that it never reads a whole source. Cost: `rows` rows."""
    stream = SourceStream(spec, spec.path, system_prompt, skip_bad_rows)
    sample = list(stream.rows(limit=rows))
    if not sample:
        raise DataError(
            f"{spec.path}: no usable row in the first {stream.rows_read} rows (skipped {stream.skipped}); "
            "fix the rows, or read more of them with --sample_rows"
        )
    dataset = datasets.Dataset.from_list(sample, features=datasets.Features(NORMALISED_FEATURES))
    return LoadedSource(
        name=spec.path, format=stream.format, dataset=dataset, rows_read=stream.rows_read, skipped=dict(stream.skipped)
    )


def _resolve_shards(spec: DatasetSpec) -> list[Shard]:
    """The files of a local file or folder, read by our seekable readers; anything else as one `datasets` stream."""
    kind = source_kind(spec)
    if kind == "file":
        return [_file_shard(Path(spec.path), spec)]
    if kind == "folder":
        try:
            builder = datasets.load_dataset_builder(spec.path)
        except Exception as err:
            raise DataError(f"{spec.path}: could not read the folder as a dataset ({err})") from None
        data_files = builder.config.data_files or {}
        if spec.split not in data_files:
            raise DataError(
                f"{spec.path}: no '{spec.split}' split in the folder (found {sorted(map(str, data_files))}); "
                "set `split:` under `datasets`"
            )
        files = [Path(file) for file in data_files[spec.split]]
        if builder.name in set(FILE_BUILDERS.values()) and all(f.suffix.lower() in FILE_BUILDERS for f in files):
            return [_file_shard(file, spec) for file in files]
    return [Shard(name=spec.path, reader="datasets")]


def _file_shard(path: Path, spec: DatasetSpec) -> Shard:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return Shard(str(path), "json_list" if starts_with(path, "[") else "lines")
    return Shard(str(path), {".jsonl": "lines", ".csv": "csv", ".parquet": "parquet"}[suffix])


def _rows(spec: DatasetSpec, shard: Shard, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """The raw rows of a shard from `cursor` on, each with the cursor of the row after it."""
    path = Path(shard.name)
    if shard.reader == "lines":
        return _json_lines(path, spec, cursor)
    if shard.reader == "csv":
        return _csv_rows(path, cursor)
    if shard.reader == "parquet":
        return _parquet_rows(path, cursor)
    if shard.reader == "json_list":
        return _json_list_rows(path, cursor)
    return _datasets_rows(spec, cursor)


def _json_lines(path: Path, spec: DatasetSpec, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    offset, line_number = (cursor["byte"], cursor["line"]) if cursor else (0, 0)
    with path.open("rb") as handle:
        handle.seek(offset)
        for line in handle:
            offset += len(line)
            line_number += 1
            text = decode_line(path, line_number, line)
            if not text.strip():
                continue
            try:
                row = parse_json_line(path, line_number, text)
            except DataError:
                if line_number == 1 and path.suffix.lower() == ".json":
                    check_json_layout(path, spec)  # one object spread over lines: say how the file should look
                raise
            yield row, {"byte": offset, "line": line_number}


def _csv_rows(path: Path, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """CSV records with Python's csv module, fed one counted line at a time so that the byte offset after each
    record is known (a quoted cell may span lines). Blank lines are skipped, as pandas does."""
    with path.open("rb") as handle:
        lines = _CountedLines(handle, path)
        header = next(csv.reader(lines), None)
        if header is None:
            return
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        if cursor:
            handle.seek(cursor["byte"])
            lines.offset, lines.line_number = cursor["byte"], cursor["line"]
        for record in csv.reader(lines):
            if not record:
                continue
            if len(record) > len(header):
                raise DataError(
                    f"{path}: line {lines.line_number}: {len(record)} cells, but the header has "
                    f"{len(header)}; quote cells that contain commas"
                )
            row = {
                column: (record[i] if i < len(record) and record[i] != "" else None) for i, column in enumerate(header)
            }
            yield row, {"byte": lines.offset, "line": lines.line_number}


class _CountedLines:
    """Lines of a binary file as text, counting bytes and lines read so far."""

    def __init__(self, handle: Any, path: Path) -> None:
        self.handle, self.path, self.offset, self.line_number = handle, path, 0, 0

    def __iter__(self) -> _CountedLines:
        return self

    def __next__(self) -> str:
        line = self.handle.readline()
        if not line:
            raise StopIteration
        self.offset += len(line)
        self.line_number += 1
        return decode_line(self.path, self.line_number, line)


def _parquet_rows(path: Path, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """Rows from the row group that holds the cursor's row on; the metadata says where each group starts."""
    start = cursor["row"] if cursor else 0
    try:
        file = pq.ParquetFile(path)
    except Exception as err:
        raise DataError(f"{path}: could not read the file as Parquet ({type(err).__name__}: {err})") from None
    group_start = 0
    for group in range(file.num_row_groups):
        group_rows = file.metadata.row_group(group).num_rows
        if group_start + group_rows <= start:
            group_start += group_rows
            continue
        row = group_start
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
            skip = min(batch.num_rows, max(0, start - row))
            row += skip
            for item in batch.slice(skip).to_pylist():
                row += 1
                yield item, {"row": row}
        group_start += group_rows


def _json_list_rows(path: Path, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """A .json file holding one list: JSON has no row boundaries to seek to, so it is parsed whole."""
    start = cursor["row"] if cursor else 0
    try:
        rows = parse_json_file(path)
    except UnicodeDecodeError:
        with path.open("rb") as handle:  # name the first line that is not UTF-8
            for line_number, line in enumerate(handle, start=1):
                decode_line(path, line_number, line)
        raise
    for index in range(start, len(rows)):
        if not isinstance(rows[index], dict):
            raise list_item_error(path, index + 1, rows[index])
        yield rows[index], {"row": index + 1}


def _datasets_rows(spec: DatasetSpec, cursor: Cursor) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """A hub dataset (or a folder of files our readers do not open) as a `datasets` stream, whose own state
    resumes it: exact, but it reads the current shard again up to the saved row."""
    try:
        stream = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=True)
    except Exception as err:
        raise DataError(f"{spec.path}: could not load the dataset as a stream (split '{spec.split}'): {err}") from None
    if cursor:
        stream.load_state_dict(cursor["datasets"])
    for row in stream:
        yield row, {"datasets": stream.state_dict()}
