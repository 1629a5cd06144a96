"""Split stage: stream the URL CSV into P Parquet partitions, checking it on the way.

    python -m landmarks.split --csv URLS.csv --settings '{"partitions": P}' --out-dir results/split

writes `part-000.parquet` ... `part-{P-1:03d}.parquet`, columns `id` (str), `url` (str),
`landmark_id` (nullable Int64), `split` (nullable str), `row` (1-based data row of the CSV).

* A row goes to part `stable_id_hash(id) % P` (FNV-1a 64 over the id's UTF-8 bytes, then the
  MurmurHash3 finaliser), so the assignment depends on the id alone: reordering or appending to the
  CSV never moves an id to another part. Within a part, rows keep the CSV order.
* The CSV is read in blocks with pyarrow's streaming reader. Memory is bounded by the block size,
  the write buffers and 8 bytes per row for duplicate detection (the 64-bit id hashes; the ids
  themselves are only revisited in a second pass when two hashes collide), so millions of rows fit
  in a few hundred MB.
* Input problems stop the stage with the file named: unreadable file, empty CSV, missing `id`/`url`
  columns, a landmark_id that is not an integer (with its rows), duplicate ids (with their rows).
  Nothing is written unless the whole CSV is valid (all parts are renamed into place at the end).
* Columns beyond id, url, landmark_id and split are ignored. An empty landmark_id means a
  non-landmark photo (null). Ids that are not safe file names are passed on: the download stage
  reports them per row (`bad_id`) instead of failing the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import resource
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .common import StageError, atomic_path, run_cli, setup_logging
from .config import add_settings_argument, parse_settings
from .tables import PART_SCHEMA, part_name

log = logging.getLogger("landmarks.split")

REQUIRED_COLUMNS = ("id", "url")
OPTIONAL_COLUMNS = ("landmark_id", "split")
BLOCK_SIZE = 8 << 20  # bytes of CSV parsed at a time
ROW_GROUP_ROWS = 128_000  # a part's buffer is flushed as one row group at this size ...
BUFFERED_ROWS_LIMIT = 500_000  # ... and all buffers are flushed when they hold this many rows
MAX_LISTED = 10  # offending rows named in an error message

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MASK64 = (1 << 64) - 1


def stable_id_hash(image_id: str) -> int:
    """Reference (pure Python) 64-bit hash of an id; `hash_ids` computes the same, vectorised."""
    h = int(_FNV_OFFSET)
    for byte in image_id.encode("utf-8"):
        h = ((h ^ byte) * int(_FNV_PRIME)) & _MASK64
    return _fmix64_int(h)


def partition_of(image_id: str, partitions: int) -> int:
    """The part an id lands in: what `split` does, for one id."""
    return stable_id_hash(image_id) % partitions


def _fmix64_int(h: int) -> int:
    # MurmurHash3's finaliser spreads FNV's weak low bits, so `% P` is uniform for any P.
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB3F53FE1A3E9) & _MASK64
    h ^= h >> 33
    return h


def hash_ids(ids: pa.Array) -> np.ndarray:
    """`stable_id_hash` of every string in `ids`, as uint64, without a Python loop per row.

    Rows are ordered by length (longest first) so that at byte position j the rows still being
    hashed are a prefix: the work is proportional to the total length of the ids, however uneven.
    """
    ids = ids.cast(pa.large_string()) if ids.type != pa.large_string() else ids
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    _, offsets_buf, data_buf = ids.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[ids.offset : ids.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts = offsets[:-1][order]
    ascending = lengths[order][::-1]
    still_going = n - np.searchsorted(ascending, np.arange(int(lengths.max())), side="right")
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    for j, k in enumerate(still_going):
        h[:k] ^= data[starts[:k] + j]
        h[:k] *= _FNV_PRIME  # wraps modulo 2**64, as FNV wants
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB3F53FE1A3E9)
    h ^= h >> np.uint64(33)
    result = np.empty_like(h)
    result[order] = h
    return result


# ----------------------------------------------------------------------------- reading the CSV


def _open_csv(path: Path, columns: list[str] | None = None) -> pacsv.CSVStreamingReader:
    """Open the CSV for streaming (every column read as text), naming the file on failure."""
    if not path.exists():
        raise StageError(f"{path}: file not found")
    if path.is_dir():
        raise StageError(f"{path}: is a folder, not a CSV file")
    try:
        # Compression by content, not by name: train.csv.gz, and a gzip file that kept the name .csv.
        stream = pa.input_stream(str(path), compression=_compression_of(path))
        return pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(block_size=BLOCK_SIZE, use_threads=False),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns or ()},
                strings_can_be_null=False,
            ),
        )
    except PermissionError as err:
        raise StageError(f"{path}: cannot be read ({err.strerror})") from err
    except (pa.ArrowInvalid, OSError) as err:
        if "Empty CSV file" in str(err):
            raise StageError(f"{path}: the CSV is empty (expected a header 'id,url,landmark_id')") from err
        raise StageError(f"{path}: cannot parse the CSV ({_arrow_message(err)})") from err


# File signatures: the compressions Arrow reads, and formats that are not a CSV at all.
_COMPRESSIONS = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd", b"\xfd7zXZ\x00": "xz"}
_NOT_CSV = {
    b"PK\x03\x04": "a zip archive (unzip it first)",
    b"PAR1": "a Parquet file",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"%PDF": "a PDF document",
}


def _compression_of(path: Path) -> str | None:
    """The compression the file's first bytes show (None: plain text); refuses files that are not text."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, compression in _COMPRESSIONS.items():
        if head.startswith(magic):
            return compression
    for magic, what in _NOT_CSV.items():
        if head.startswith(magic):
            raise StageError(f"{path}: this is {what}, not a CSV (its first bytes: {head!r})")
    if b"\x00" in head:
        raise StageError(f"{path}: binary data, not a CSV text file (its first bytes: {head!r})")
    return None


def _arrow_message(err: Exception) -> str:
    # Arrow's "Row #N" counts the header as row 1: it is the line number, so say so.
    return re.sub(r"Row #(\d+)", r"line \1", str(err))


def _column_names(path: Path) -> dict[str, str]:
    """Map the stripped header names to the names as written, checking the required ones."""
    reader = _open_csv(path)
    names = reader.schema.names
    reader.close()
    by_clean_name = {name.strip(): name for name in names}
    missing = [c for c in REQUIRED_COLUMNS if c not in by_clean_name]
    if missing:
        raise StageError(
            f"{path}: missing column(s) {', '.join(repr(m) for m in missing)}; the header has "
            f"{', '.join(repr(n) for n in names)} (expected id,url,landmark_id[,split])"
        )
    return {c: by_clean_name[c] for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in by_clean_name}


def _batches(path: Path, columns: dict[str, str]):
    """Yield (record batch with the wanted columns, number of the batch's first data row)."""
    reader = _open_csv(path, list(columns.values()))
    first_row = 1
    try:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowInvalid, OSError) as err:
                raise StageError(f"{path}: cannot parse the CSV ({_arrow_message(err)})") from err
            yield batch, first_row
            first_row += batch.num_rows
    finally:
        reader.close()


_INTEGER = r"^[+-]?[0-9]+$"


def _parse_landmark_ids(raw: pa.Array, first_row: int, path: Path) -> pa.Array:
    """Empty -> null (a non-landmark photo); an integer -> int64; anything else is an error."""
    text = pc.utf8_trim_whitespace(raw)
    empty = pc.equal(text, "")
    bad = pc.and_(pc.invert(empty), pc.invert(pc.match_substring_regex(text, _INTEGER)))
    if pc.any(bad).as_py():
        rows = np.flatnonzero(bad.to_numpy(zero_copy_only=False)) + first_row
        values = pc.filter(raw, bad).to_pylist()[:MAX_LISTED]
        listed = ", ".join(f"row {r} ({v!r})" for r, v in zip(rows[:MAX_LISTED], values))
        more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
        raise StageError(
            f"{path}: landmark_id must be an integer or empty (empty = non-landmark photo); "
            f"bad values at {listed}{more} (row = data row, the header is not counted)"
        )
    try:
        return pc.cast(pc.if_else(empty, None, text), pa.int64())
    except pa.ArrowInvalid as err:  # e.g. a number that does not fit in 64 bits
        raise StageError(f"{path}: landmark_id out of range near row {first_row} ({err})") from err


# ----------------------------------------------------------------------------- duplicates


def _find_duplicates(path: Path, columns: dict[str, str], hashes: np.ndarray) -> str | None:
    """Describe the duplicate ids (with their rows), or None when there are none.

    The first pass kept only 64-bit hashes of the non-empty ids (8 bytes a row). Equal hashes are
    candidates; a second pass over the ids confirms them, so a hash collision is never reported.
    """
    ordered = np.sort(hashes)
    candidates = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(candidates) == 0:
        return None
    rows_by_id: dict[str, list[int]] = {}
    for batch, first_row in _batches(path, {"id": columns["id"]}):
        ids = batch.column(0)
        hit = np.flatnonzero(np.isin(hash_ids(ids), candidates))
        if len(hit):
            for i, image_id in zip(hit, ids.take(pa.array(hit)).to_pylist()):
                if image_id:
                    rows_by_id.setdefault(image_id, []).append(int(first_row + i))
    duplicates = {k: v for k, v in rows_by_id.items() if len(v) > 1}
    if not duplicates:
        return None
    listed = "; ".join(
        f"{image_id!r} at rows {', '.join(map(str, rows[:MAX_LISTED]))}" + (" ..." if len(rows) > MAX_LISTED else "")
        for image_id, rows in sorted(duplicates.items(), key=lambda item: item[1][0])[:MAX_LISTED]
    )
    more = f" and {len(duplicates) - MAX_LISTED} more ids" if len(duplicates) > MAX_LISTED else ""
    return (
        f"{path}: {len(duplicates)} duplicate id(s): {listed}{more} "
        "(row = data row, the header is not counted; each id must appear once)"
    )


# ----------------------------------------------------------------------------- writing the parts


class _PartWriters:
    """One ParquetWriter per part, fed through per-part buffers so row groups stay large."""

    def __init__(self, tmp_paths: list[Path]):
        self.paths = tmp_paths
        self.writers: list[pq.ParquetWriter | None] = [None] * len(tmp_paths)
        self.buffers: list[list[pa.Table]] = [[] for _ in tmp_paths]
        self.buffered = [0] * len(tmp_paths)
        self.rows = [0] * len(tmp_paths)

    def add(self, part: int, table: pa.Table) -> None:
        self.buffers[part].append(table)
        self.buffered[part] += table.num_rows
        self.rows[part] += table.num_rows
        if self.buffered[part] >= ROW_GROUP_ROWS:
            self._flush(part)
        elif sum(self.buffered) >= BUFFERED_ROWS_LIMIT:
            for k in range(len(self.paths)):
                self._flush(k)

    def _flush(self, part: int) -> None:
        if not self.buffers[part]:
            return
        if self.writers[part] is None:
            self.writers[part] = pq.ParquetWriter(self.paths[part], PART_SCHEMA)
        self.writers[part].write_table(pa.concat_tables(self.buffers[part]), row_group_size=ROW_GROUP_ROWS)
        self.buffers[part] = []
        self.buffered[part] = 0

    def close(self) -> None:
        for k, path in enumerate(self.paths):
            self._flush(k)
            if self.writers[k] is None:  # a part with no rows is still a valid, empty table
                pq.write_table(PART_SCHEMA.empty_table(), path)
            else:
                self.writers[k].close()


def _allow_open_files(count: int) -> None:
    """Many partitions mean many open writers: raise the soft open-file limit when needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 64
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise StageError(
                f"{count} partitions need {wanted} open files, but the limit is {hard}; use fewer partitions"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def part_table(batch: pa.RecordBatch, first_row: int, columns: dict[str, str], csv_path: Path) -> pa.Table:
    """A CSV batch as part rows (PART_SCHEMA): the CSV's columns by their canonical names, a null
    landmark_id or split where the CSV has none, and each row's number in the CSV."""
    n = batch.num_rows

    def column(name: str) -> pa.Array:
        return batch.column(batch.schema.get_field_index(columns[name]))

    return pa.table(
        {
            "id": column("id"),
            "url": column("url"),
            "landmark_id": (
                _parse_landmark_ids(column("landmark_id"), first_row, csv_path)
                if "landmark_id" in columns
                else pa.nulls(n, pa.int64())
            ),
            "split": _empty_to_null(column("split")) if "split" in columns else pa.nulls(n, pa.string()),
            "row": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
        },
        schema=PART_SCHEMA,
    )


def _add_to_parts(writers: _PartWriters, table: pa.Table, parts: np.ndarray, partitions: int) -> None:
    """Give each part writer its rows of `table` (`parts`: each row's part)."""
    # A stable sort groups each part's rows while keeping their CSV order.
    order = np.argsort(parts, kind="stable")
    bounds = np.searchsorted(parts[order], np.arange(partitions + 1))
    for k in range(partitions):
        if bounds[k + 1] > bounds[k]:
            writers.add(k, table.take(pa.array(order[bounds[k] : bounds[k + 1]])))


def split_csv(csv_path: str | Path, partitions: int, out_dir: str | Path) -> list[int]:
    """Write the P part files; return the number of rows in each."""
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    if partitions < 1:
        raise StageError(f"split.partitions must be at least 1 (got {partitions})")
    started = time.monotonic()
    columns = _column_names(csv_path)
    if "landmark_id" not in columns:
        log.warning("%s has no landmark_id column: every row gets a null landmark_id", csv_path)
    _allow_open_files(partitions)
    out_dir.mkdir(parents=True, exist_ok=True)

    id_hashes: list[np.ndarray] = []
    total = 0
    with contextlib.ExitStack() as stack:
        # Every part is written to a temporary file and renamed only when the whole CSV passed.
        tmp_paths = [
            stack.enter_context(atomic_path(out_dir / part_name(k), suffix=".parquet.part")) for k in range(partitions)
        ]
        writers = _PartWriters(tmp_paths)
        for batch, first_row in _batches(csv_path, columns):
            table = part_table(batch, first_row, columns, csv_path)
            ids = batch.column(batch.schema.get_field_index(columns["id"]))
            hashes = hash_ids(ids)
            id_hashes.append(hashes[pc.not_equal(ids, "").to_numpy(zero_copy_only=False)])
            _add_to_parts(writers, table, hashes % np.uint64(partitions), partitions)
            total += batch.num_rows
        if total == 0:
            raise StageError(f"{csv_path}: the CSV has a header but no rows")
        problem = _find_duplicates(csv_path, columns, np.concatenate(id_hashes))
        if problem:
            raise StageError(problem)
        writers.close()
    _remove_stale_parts(out_dir, partitions)
    log.info(
        "%s: %d rows into %d parts in %s (%.1f s); rows per part: min %d, max %d",
        csv_path,
        total,
        partitions,
        out_dir,
        time.monotonic() - started,
        min(writers.rows),
        max(writers.rows),
    )
    return writers.rows


def _empty_to_null(values: pa.Array) -> pa.Array:
    trimmed = pc.utf8_trim_whitespace(values)
    return pc.if_else(pc.equal(trimmed, ""), None, trimmed)


def _remove_stale_parts(out_dir: Path, partitions: int) -> None:
    """Parts beyond P left by an earlier run with more partitions would be read by mistake."""
    for path in out_dir.glob("part-*.parquet"):
        match = re.fullmatch(r"part-(\d+)\.parquet", path.name)
        if match and int(match.group(1)) >= partitions:
            log.info("removing %s, left from an earlier run with more partitions", path)
            path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m landmarks.split",
        description="Stream a Google Landmarks URL CSV (id,url,landmark_id[,split]) into P Parquet "
        "partitions part-000.parquet ... (a row's part depends on its id only).",
    )
    parser.add_argument("--csv", required=True, help="input CSV (may be .gz); columns id,url[,landmark_id][,split]")
    add_settings_argument(parser, "split")  # partitions: number of parts P (one download job each)
    parser.add_argument("--out-dir", required=True, help="folder for part-000.parquet ... part-{P-1:03d}.parquet")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    settings = parse_settings(args.settings, "split")
    split_csv(args.csv, settings["partitions"], args.out_dir)
    return 0


if __name__ == "__main__":
    run_cli(main)
