"""The results file of ``boatvit predict``: one row per image, written as rows are computed, resumable, and one file
from many processes.

Columns: ``image`` (the path as found), then for each rank r = 1..k ``name_r``, ``index_r`` and ``probability_r``,
then ``error``: empty (None) for a predicted image, the reason for an unreadable one, whose other columns are empty.

Formats, by extension:

* ``.csv``, ``.jsonl``: rows are appended to the file itself and flushed after every batch, so a killed run keeps
  every finished batch. A row is written whole or, when the process dies inside the write, as a last line without
  its newline, which the next ``--resume`` cuts off.
* ``.json`` (one array) and ``.parquet`` (needs pyarrow): neither can be appended row by row, so rows stream to
  ``<file>.partial.jsonl`` beside it and the file is written from it atomically (a temporary file renamed over it)
  once every image is done; the ``.partial.jsonl`` is then removed. A resumed run reads both.

``<file>.meta.json`` beside it records what the file was written for: the weights (path, the file's SHA-256, the
checkpoint entry), the model and its arguments, the top-k and the class names. ``--resume`` refuses a file written
for other weights or another top-k, and an existing file is replaced only with ``--overwrite``.

Under torchrun each rank appends to its own ``<file>.rank<r>.partial.jsonl``; rank 0 merges them into the file and
removes them at the end. A run killed before the merge leaves them behind, and the next run merges them first, each
image once: the images of a file are the union of everything above, told apart by their absolute paths.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import UsageError
from .runs import atomic_path, write_json
from .runtime import require_extra

__all__ = ['RESULT_FORMATS', 'PARQUET_EXTRA', 'result_columns', 'flat_row', 'check_results_path', 'ResultsFile']

#: the extensions a results file may have
RESULT_FORMATS = ('.csv', '.jsonl', '.json', '.parquet')
#: the extra that installs pyarrow, for .parquet results
PARQUET_EXTRA = 'parquet'
# formats that are appended to in place; the others are written whole at the end, from a .partial.jsonl
_APPENDABLE = ('.csv', '.jsonl')
_RECORD_CHECKED = ('weights_sha256', 'entry', 'model', 'model_kwargs', 'topk')


def result_columns(k: int) -> List[str]:
    """The columns of a results file with ``k`` classes per image (the top-k, at most the number of classes)."""
    ranked = [f'{field}_{r}' for r in range(1, k + 1) for field in ('name', 'index', 'probability')]
    return ['image', *ranked, 'error']


def flat_row(entry: Mapping[str, Any], k: int) -> Dict[str, Any]:
    """A results-file row from a `boatvit.prediction.predict` entry (``{'image', 'predictions'}`` or
    ``{'image', 'error'}``)."""
    row: Dict[str, Any] = dict.fromkeys(result_columns(k))
    row['image'] = entry['image']
    # one line per row in every format: a newline inside a CSV cell would hide a torn row from the resume
    row['error'] = entry['error'].replace('\n', ' ') if 'error' in entry else None
    for pred in entry.get('predictions', ()):
        r = pred['rank']
        row[f'name_{r}'], row[f'index_{r}'], row[f'probability_{r}'] = pred['name'], pred['index'], pred['probability']
    return row


def check_results_path(path: os.PathLike) -> Path:
    """``path`` as a results file, checked before anything is loaded: a known extension, in a folder that exists,
    and pyarrow installed for ``.parquet``.

    Raises:
        UsageError: naming the path and what to pass instead.
    """
    path = Path(path)
    if path.suffix.lower() not in RESULT_FORMATS:
        raise UsageError(
            f'--results-file {path}: unknown extension {path.suffix or "(none)"!r}; use one of '
            f'{", ".join(RESULT_FORMATS)}'
        )
    if not path.parent.is_dir():
        raise UsageError(f'--results-file {path}: the folder {path.parent} does not exist; create it first')
    if path.is_dir():
        raise UsageError(f'--results-file {path} is a directory; pass a file name in it, e.g. {path / "results.csv"}')
    if path.suffix.lower() == '.parquet':
        require_extra('pyarrow', 'pyarrow', 'a .parquet results file', extra=PARQUET_EXTRA)
    return path


def _key(image: str) -> str:
    """What tells two rows' images apart: the absolute path, so that ``photos/a.jpg`` and ``./photos/a.jpg`` are one."""
    return os.path.abspath(image)


def _complete_lines(path: Path, cut: bool) -> bytes:
    """The file's bytes up to its last newline; with ``cut``, a torn last line (a process killed inside a write) is
    also cut off the file itself."""
    data = path.read_bytes()
    end = data.rfind(b'\n') + 1
    if cut and end < len(data):
        with open(path, 'r+b') as f:
            f.truncate(end)
    return data[:end]


def _read_jsonl(path: Path, cut: bool = False) -> List[Dict[str, Any]]:
    rows = []
    for number, line in enumerate(_complete_lines(path, cut).decode().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UsageError(
                f'{path}: line {number} is not a JSON row ({e}); the file was changed by hand or corrupted: '
                'remove that line, or start anew with --overwrite'
            ) from e
    return rows


def _encode_csv(rows: Iterable[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\n').writerows(rows)
    return buffer.getvalue()


@dataclass
class ResultsFile:
    """A results file (see the module docstring) with ``k`` classes per row.

    Attributes:
        path: the file the user named.
        k: classes per image.
    """

    path: Path
    k: int

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()

    @property
    def stream(self) -> Path:
        """Where rows are appended in a single process: the file itself, or its ``.partial.jsonl``."""
        return self.path if self.suffix in _APPENDABLE else self._beside('.partial.jsonl')

    @property
    def meta_path(self) -> Path:
        return self._beside('.meta.json')

    def shard(self, rank: int) -> Path:
        """The rows of rank ``rank`` of a torchrun run, before rank 0 merges them."""
        return self._beside(f'.rank{rank}.partial.jsonl')

    def _beside(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def _shards(self) -> List[Path]:
        pattern = glob.escape(self.path.name) + '.rank*.partial.jsonl'
        return sorted(self.path.parent.glob(pattern))

    def _files(self) -> List[Path]:
        """Every file that holds rows of this results file, or its record; those that exist."""
        return [p for p in dict.fromkeys([self.path, self.stream, self.meta_path, *self._shards()]) if p.exists()]

    # --- before a run: read-only checks (every rank), then rank 0 prepares the files --------------------------------

    def check(self, record: Mapping[str, Any], resume: bool, overwrite: bool) -> None:
        """Refuse to touch an existing file unless asked to: without ``resume`` or ``overwrite``, or with ``resume``
        when it was written for other weights, another model or another top-k. Reads only.

        Raises:
            UsageError: naming the file, what differs and what to pass.
        """
        if resume and overwrite:
            raise UsageError('--resume and --overwrite contradict each other; pass one')
        existing = self._files()
        if not existing or overwrite:
            return
        if not resume:
            raise UsageError(
                f'{existing[0]} already exists; pass --resume to predict only the images it lacks, --overwrite to '
                'start it anew, or another --results-file'
            )
        if not self.meta_path.is_file():
            raise UsageError(
                f'--resume {self.path}: there is no {self.meta_path.name} beside it saying which weights and top-k '
                'it was written for; pass --overwrite to start it anew, or another --results-file'
            )
        try:
            written_for = json.loads(self.meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f'--resume: {self.meta_path} cannot be read ({e}); pass --overwrite to start anew') from e
        for key in _RECORD_CHECKED:
            if written_for.get(key) != record[key]:
                raise UsageError(f'--resume {self.path}: {_difference(key, written_for, record)}')

    def start(self, record: Mapping[str, Any], overwrite: bool) -> None:
        """Rank 0, after :meth:`check`: remove the old files with ``overwrite``; record what the file is for; cut a
        torn last row; merge the rows a killed torchrun run left in its shards."""
        if overwrite:
            for path in self._files():
                path.unlink()
        if not self.meta_path.exists():
            write_json(self.meta_path, dict(record))
        if self.stream.exists():
            _complete_lines(self.stream, cut=True)
        if self.suffix == '.csv' and (not self.path.exists() or self.path.stat().st_size == 0):
            self.path.write_text(_encode_csv([result_columns(self.k)]))
        self._merge_shards()

    def done(self) -> set:
        """The images (absolute paths) that have a row already."""
        return {_key(image) for image in self._images()}

    def lacking(self, images: Sequence[Path]) -> Tuple[List[Path], int]:
        """The images of ``images`` that have no row yet, each once and in order, and how many others there are."""
        done, todo = self.done(), {}
        for image in images:
            todo.setdefault(_key(str(image)), image)
        lacking = [image for key, image in todo.items() if key not in done]
        return lacking, len(todo) - len(lacking)

    def _images(self) -> Iterator[str]:
        if self.suffix == '.csv':
            text = _complete_lines(self.path, cut=False).decode() if self.path.exists() else ''
            yield from (row['image'] for row in csv.DictReader(io.StringIO(text)))
        else:
            yield from (row['image'] for row in self._rows())

    def _rows(self) -> Iterator[Dict[str, Any]]:
        """The rows of a ``.jsonl``, ``.json`` or ``.parquet`` file so far: the finished file's, then those of its
        ``.partial.jsonl`` that it lacks."""
        seen = set()
        finished = self._read_finished() if self.suffix not in _APPENDABLE and self.path.exists() else []
        partial = _read_jsonl(self.stream) if self.stream.exists() else []
        for row in [*finished, *partial]:
            if _key(row['image']) not in seen:
                seen.add(_key(row['image']))
                yield row

    def _read_finished(self) -> List[Dict[str, Any]]:
        if self.suffix == '.json':
            return json.loads(self.path.read_text())
        import pyarrow.parquet as pq

        return pq.read_table(self.path).to_pylist()

    # --- during a run ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self, rank: int, world_size: int) -> Iterator['RowWriter']:
        """Appends this process's rows: to :attr:`stream` in a single process, to its shard under torchrun."""
        path = self.stream if world_size == 1 else self.shard(rank)
        as_csv = path.suffix.lower() == '.csv'
        with open(path, 'a', encoding='utf-8', newline='') as f:
            yield RowWriter(f, self.k, as_csv)

    # --- after a run ---------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Rank 0, once every rank has written its rows: merge the shards into the file, then write a ``.json`` or
        ``.parquet`` file whole (atomically) and remove its ``.partial.jsonl``."""
        self._merge_shards()
        if self.suffix in _APPENDABLE:
            return
        rows = self._rows()
        with atomic_path(self.path) as tmp:
            if self.suffix == '.json':
                with open(tmp, 'w', encoding='utf-8') as f:
                    _write_json_array(f, rows)
            else:
                _write_parquet(tmp, list(rows), self.k, self.meta_path.read_text())
        self.stream.unlink(missing_ok=True)

    def _merge_shards(self) -> None:
        """Append the rows of the torchrun shards that the file lacks, then remove the shards. Killed halfway, the
        next merge skips the rows already appended."""
        shards = self._shards()
        if not shards:
            return
        done = self.done()
        with self.writer(rank=0, world_size=1) as out:
            for shard in shards:
                rows = [row for row in _read_jsonl(shard) if _key(row['image']) not in done]
                out.write(rows)
                done.update(_key(row['image']) for row in rows)
            out.sync()
        for shard in shards:
            shard.unlink()


class RowWriter:
    """Writes batches of rows to an open file, each batch in one write and flushed."""

    def __init__(self, file: io.TextIOBase, k: int, as_csv: bool):
        self.file, self.columns, self.as_csv = file, result_columns(k), as_csv

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.as_csv:
            text = _encode_csv([['' if row[c] is None else row[c] for c in self.columns] for row in rows])
        else:
            text = ''.join(json.dumps(row) + '\n' for row in rows)
        self.file.write(text)
        self.file.flush()

    def sync(self) -> None:
        """On disk, not only in the OS's buffers: before the shards it came from are removed."""
        self.file.flush()
        os.fsync(self.file.fileno())


def _difference(key: str, written_for: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    if key == 'topk':
        was = written_for.get('topk')
        return f'it was written with --topk {was}, not {record["topk"]}; pass --topk {was}, or --overwrite to restart'
    if key == 'weights_sha256':
        return (
            f'it was written for the weights {written_for.get("weights")} (SHA-256 '
            f'{str(written_for.get("weights_sha256"))[:12]}...), not {record["weights"]} (SHA-256 '
            f'{record["weights_sha256"][:12]}...); pass those weights, or --overwrite to start it anew'
        )
    return (
        f'it was written with {key} {written_for.get(key)!r}, not {record[key]!r}; pass the same weights and '
        'flags, or --overwrite to start it anew'
    )


def _write_json_array(f: io.TextIOBase, rows: Iterable[Mapping[str, Any]]) -> None:
    """A JSON array, one row per line, written as the rows come (no list of them all in memory)."""
    f.write('[')
    for i, row in enumerate(rows):
        f.write(('\n' if i == 0 else ',\n') + json.dumps(row))
    f.write('\n]\n')


def _write_parquet(path: Path, rows: List[Dict[str, Any]], k: int, record: Optional[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {'name': pa.string(), 'index': pa.int64(), 'probability': pa.float64()}
    fields = [(c, types.get(c.rpartition('_')[0], pa.string())) for c in result_columns(k)]
    # what the rows were predicted with travels inside the file too, in the schema's metadata
    schema = pa.schema(fields, metadata={'boatvit_predict': record or '{}'})
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
