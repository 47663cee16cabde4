"""`predict`: one artifact over a whole corpus, on this machine (this process or `--workers N`).

The input (JSONL or Parquet, one file or a folder of them) is read as a stream and cut into units of
`--shard-rows` rows, each named by its file and row range. A unit is answered in batches of `--batch`
rows, sorted by length within the unit (the helper pads each batch only to its longest), and written
as one Parquet shard, whole or not at all (a temporary file renamed into place); its bad rows go to a
shard of the same name in `_errors/` first. A run that stops at any instant and is started again with
the same command skips the units done (a shard, or a unit of bad rows only, recorded in the progress
file) and answers the others, so the output is the same as an uninterrupted run's: no row missing,
none twice. Names starting with `_` or `.` are what Parquet readers skip in a folder, so the output
folder reads as one dataset of answers (`pyarrow.parquet.read_table(folder)`). Batches depend only on the unit, so the answers are the same bytes
whatever the worker count, and equal to `runtime.Session`'s on the same backend.

`_progress.json` in the output folder says what the run is (input files, artifact, options) and which
units are done; a folder holding another run's output is refused.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import multiprocessing
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from runtime.errors import UserError
from runtime.files import sha256_of
from runtime.heads import parse_field
from runtime.pinned import manifest_beside
from runtime.session import Session
from runtime.threads import VARIABLE as threads_variable

ENGINES = ("local", "ray")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
PROGRESS = "_progress.json"
# A JSONL line longer than this is a bad row, passed over unread (no text a helper takes comes near it);
# a unit ends early where its lines pass UNIT_BYTES: what a worker holds stays bounded on hostile input
MAX_LINE = 16 * 2**20
UNIT_BYTES = 64 * 2**20
ERRORS = "_errors"  # the bad rows' shards, each named as its unit's
# The helper's argument for each input field where it is named otherwise (a corpus of prompts for the LM)
FIELD_NAMES = {"causal-lm": {"text": "prompt"}}
# The answer's columns, by helper: a dict's keys, else the one column that holds it
ANSWER_COLUMNS = {"answer": ("answer", "score", "start", "end"), "classify": ("label", "score"),
                  "next_sentence": ("is_next", "score"), "choose": ("choice", "text", "scores"),
                  "embed": ("embedding",), "generate": ("generated",), "tag": ("entities",), "fill_mask": ("fills",)}


@dataclass(frozen=True)
class Options:
    artifact: Path
    input: Path
    output: Path
    batch: int = 32
    shard_rows: int = 4096
    workers: int = 1
    fields: dict[str, str] = field(default_factory=dict)  # helper field -> input column
    id_column: str | None = None  # keep only this input column beside the answers
    helper_args: dict[str, Any] = field(default_factory=dict)  # the helper's other arguments (top_k=...)
    backend: str = "auto"
    public_key: Path | None = None
    strict: bool = False
    truncate: bool = False  # cut texts too long for the artifact (Session(truncate=True)) instead of refusing
    pack: bool = True  # sort rows by length within a unit before batching (off: input order; to compare)
    engine: str = "local"  # or "ray"
    ray_address: str | None = None  # None: a Ray instance of its own on this machine


@dataclass(frozen=True)
class Unit:
    """Rows [start, stop) of one input file: what one worker answers into one shard. A JSONL unit also
    knows where its lines are (bytes from `offset`, the first being line `line`), so it is read alone."""

    path: str
    file: int  # index into the run's input files
    start: int
    stop: int
    offset: int = 0
    length: int = 0
    line: int = 1

    @property
    def name(self) -> str:
        return f"part-{self.file:05d}-{self.start:012d}-{self.stop:012d}"

    def rows(self) -> list[dict[str, Any] | str]:
        """Its rows; a line that is not a JSON object (or is too long to read) comes as the reason why."""
        if FORMATS[Path(self.path).suffix] == "parquet":
            import pyarrow.parquet as pq

            parquet, at, groups, firsts = pq.ParquetFile(self.path), 0, [], []
            for group in range(parquet.metadata.num_row_groups):  # only the row groups that hold the unit
                count = parquet.metadata.row_group(group).num_rows
                if at < self.stop and at + count > self.start:
                    groups.append(group)
                    firsts.append(at)
                at += count
            first, found = firsts[0] if firsts else 0, []
            for batch in parquet.iter_batches(batch_size=1024, row_groups=groups):  # streamed, not whole groups
                low, high = max(self.start - first, 0), min(self.stop - first, batch.num_rows)
                if low < high:
                    found.extend(batch.slice(low, high - low).to_pylist())
                first += batch.num_rows
            return found
        rows: list[dict[str, Any] | str] = []
        with open(self.path, "rb") as stream:
            stream.seek(self.offset)
            for number, (_, line) in enumerate(read_lines(stream, self.length), self.line):
                if line is None:
                    rows.append(f"line {number} is longer than {MAX_LINE // 2**20} MiB")
                elif line.strip():
                    rows.append(parse_line(line, number))
        return rows


def read_lines(stream: BinaryIO, length: int | None = None) -> Iterator[tuple[int, bytes | None]]:
    """The lines of a JSONL stream (of its next `length` bytes): each line's size and bytes, or None for
    a line longer than MAX_LINE, passed over without holding it (a file without line ends is one)."""
    left = length
    while left is None or left > 0:
        line = stream.readline(MAX_LINE + 1 if left is None else min(MAX_LINE + 1, left))
        if not line:
            return
        size = len(line)
        while size > MAX_LINE and not line.endswith(b"\n"):  # pass over the rest of the line
            line = stream.readline(2**20 if left is None else min(2**20, left - size))
            if not line:
                break
            size += len(line)
        if left is not None:
            left -= size
        yield size, None if size > MAX_LINE else line


def parse_line(line: bytes, number: int) -> dict[str, Any] | str:
    try:
        row = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        return f"line {number} is not JSON ({err.msg})"
    except RecursionError:
        return f"line {number} is nested too deeply"
    return row if isinstance(row, dict) else f"line {number} is not a JSON object"


def input_files(path: Path) -> list[Path]:
    """The files of the corpus, checked readable and of a known format before any work."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in FORMATS and p.is_file())
        if not files:
            raise UserError(f"--input {path}: no .jsonl or .parquet files in this folder")
    elif path.is_file():
        if path.suffix not in FORMATS:
            raise UserError(f"--input {path}: not a .jsonl or .parquet file")
        files = [path]
    else:
        raise UserError(f"--input {path}: no such file or folder")
    for file in files:
        try:
            if FORMATS[file.suffix] == "parquet":
                import pyarrow.parquet as pq

                pq.ParquetFile(file).schema_arrow
            else:
                with open(file, "rb") as stream:
                    stream.read(1)
        except ImportError:
            raise UserError("reading Parquet needs pyarrow: pip install 'megatron-deploy[predict]'") from None
        except Exception as err:  # pyarrow says ArrowInvalid for a file that is not Parquet
            raise UserError(f"--input {file}: cannot be read as {FORMATS[file.suffix]} ({str(err)[:120]})") from None
    return files


def units(files: list[Path], size: int) -> Iterator[Unit]:
    """The corpus cut into units of `size` rows (fewer where a JSONL unit would pass UNIT_BYTES, and a
    file's last), found without holding any row: a Parquet file's row count, a JSONL file's line ends
    (a blank line is no row)."""
    for index, file in enumerate(files):
        if FORMATS[file.suffix] == "parquet":
            import pyarrow.parquet as pq

            total = pq.ParquetFile(file).metadata.num_rows
            for start in range(0, total, size):
                yield Unit(str(file), index, start, min(start + size, total))
            continue
        with open(file, "rb") as stream:
            start = rows = begin = offset = 0
            first = 1
            for number, (length, line) in enumerate(read_lines(stream), 1):
                rows += line is None or bool(line.strip())
                offset += length
                if rows - start == size or (offset - begin >= UNIT_BYTES and rows > start):
                    yield Unit(str(file), index, start, rows, begin, offset - begin, first)
                    start, begin, first = rows, offset, number + 1
            if rows > start:
                yield Unit(str(file), index, start, rows, begin, offset - begin, first)


class Answerer:
    """One Session and how a row of the input becomes the helper's arguments and the answer's columns."""

    def __init__(self, options: Options):
        self.options = options
        self.session = Session(options.artifact, backend=options.backend, public_key=options.public_key,
                               truncate=options.truncate)
        head = self.session.head
        self.helper = head.helpers[0]
        renamed = FIELD_NAMES.get(head.name, {})
        # The head's fields in the helper's order, as far as its parameters take texts (required, or None by
        # default: pretraining's fill_mask takes no second text): (field, input column, required, is a list)
        parameters = list(inspect.signature(getattr(self.session, self.helper)).parameters.values())
        self.arguments = []
        for (name, required, is_list), parameter in zip(map(parse_field, head.fields), parameters):
            if parameter.default not in (inspect.Parameter.empty, None):
                break
            name = renamed.get(name, name)
            self.arguments.append((name, options.fields.get(name, name), required, is_list))
        others = [p.name for p in parameters[len(self.arguments):]]
        unknown = sorted(set(options.helper_args) - set(others))
        if unknown:
            raise UserError(f"--helper-args: {self.helper} takes no {', '.join(unknown)}; it takes "
                            f"{', '.join(others) or 'nothing more'}")

    def problem(self, row: dict[str, Any]) -> str | None:
        for argument, column, required, is_list in self.arguments:
            value = row.get(column)
            if value is None and not required:
                continue
            if value is None:
                return f"no field {column!r}" + (f" (the {argument})" if column != argument else "")
            ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) if is_list else isinstance(value, str)
            if not ok:
                return f"field {column!r} must be {'a list of texts' if is_list else 'a text'}"
        return None

    def call(self, rows: list[dict[str, Any]]) -> list[Any]:
        """The helper over `rows`, one call per set of fields present (a text pair or not), in row order."""
        shapes: dict[tuple[str, ...], list[int]] = {}
        for index, row in enumerate(rows):
            shapes.setdefault(tuple(c for _, c, _, _ in self.arguments if row.get(c) is not None), []).append(index)
        results: list[Any] = [None] * len(rows)
        for columns, indices in shapes.items():
            texts = ([rows[i][c] for i in indices] for c in columns)
            answers = getattr(self.session, self.helper)(*texts, **self.options.helper_args)
            for i, answer in zip(indices, answers):
                results[i] = answer
        return results

    def answer(self, unit: Unit) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The unit's answered rows (input columns and answer columns, in input order) and its bad rows."""
        good: list[tuple[int, dict[str, Any]]] = []
        errors: list[dict[str, Any]] = []
        for offset, row in enumerate(unit.rows()):
            reason = row if isinstance(row, str) else self.problem(row)
            if reason is None:
                good.append((offset, row))  # type: ignore[arg-type]
            else:
                errors.append({"id": self.row_id(unit, offset, row), "reason": reason})
        if self.options.pack:  # sorted by length within the unit: each batch holds texts of about one length
            good.sort(key=lambda item: sum(len(str(item[1].get(c) or "")) for _, c, _, _ in self.arguments))
        answered: dict[int, dict[str, Any]] = {}
        for first in range(0, len(good), self.options.batch):
            batch = good[first:first + self.options.batch]
            for (offset, row), result in zip(batch, self.batch_answers(unit, batch, errors)):
                if result is not None:
                    answered[offset] = {**self.kept(row), **self.columns(result)}
        return [answered[o] for o in sorted(answered)], errors

    def batch_answers(self, unit: Unit, batch: list[tuple[int, dict[str, Any]]],
                      errors: list[dict[str, Any]]) -> list[Any]:
        try:
            return self.call([row for _, row in batch])
        except UserError:  # a row the helper refuses (too long, say): find it, answer the others alone
            results = []
            for offset, row in batch:
                try:
                    results.append(self.call([row])[0])
                except UserError as err:
                    errors.append({"id": self.row_id(unit, offset, row), "reason": str(err)})
                    results.append(None)
            return results

    def row_id(self, unit: Unit, offset: int, row: Any) -> str:
        if self.options.id_column and isinstance(row, dict) and self.options.id_column in row:
            return str(row[self.options.id_column])
        return f"{unit.file}:{unit.start + offset}"

    def kept(self, row: dict[str, Any]) -> dict[str, Any]:
        """The input's columns beside the answer: all (one named as an answer column gets `input_`), or --id."""
        if self.options.id_column:
            return {self.options.id_column: row.get(self.options.id_column)}
        return {f"input_{k}" if k in ANSWER_COLUMNS[self.helper] else k: v for k, v in row.items()}

    def columns(self, result: Any) -> dict[str, Any]:
        names = ANSWER_COLUMNS[self.helper]
        if isinstance(result, dict):
            return {name: result[name] for name in names}
        return {names[0]: result.astype(np.float32) if isinstance(result, np.ndarray) else result}


def write_shard(path: Path, rows: list[dict[str, Any]]) -> None:
    """`rows` as one Parquet file at `path`, whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {}
    for name in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(name) for row in rows]
        vectors = [v for v in values if isinstance(v, np.ndarray)]
        if values and len(vectors) == len(values):  # embeddings: fixed-size float lists
            flat = pa.array(np.concatenate(vectors).astype(np.float32))
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, len(vectors[0]))
        else:
            try:
                columns[name] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # an input column of mixed types: kept as JSON text
                columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    scratch = path.with_name(f".{path.name}.incoming")
    pq.write_table(pa.table(columns), scratch)
    os.replace(scratch, path)


# ---- one worker process --------------------------------------------------------------------------

_ANSWERER: Answerer | None = None


def _open(options: Options, threads: int | None = None) -> None:
    """This process's Answerer. `threads`: its share of the machine's cores, unless MEGATRON_DEPLOY_THREADS
    says otherwise (workers that each took every core would wait on one another)."""
    global _ANSWERER
    if threads is not None:
        os.environ.setdefault(threads_variable, str(threads))
    _ANSWERER = Answerer(options)


def _start_worker(options: Options, threads: int) -> None:
    """A local worker process: its Answerer, and an end when predict's ends (a killed run leaves no worker
    answering for nobody)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    _open(options, threads)


def _open_no_more() -> None:
    global _ANSWERER
    _ANSWERER = None


def _work(unit: Unit, output: Path) -> tuple[str, int, int]:
    """Answer one unit and write its shards: errors first, then the answers (whose file marks it done;
    a unit without one is done once the progress file says so)."""
    assert _ANSWERER is not None
    answered, errors = _ANSWERER.answer(unit)
    if errors:
        write_shard(output / ERRORS / f"{unit.name}.parquet", errors)
    if answered:
        write_shard(output / f"{unit.name}.parquet", answered)
    return unit.name, unit.stop - unit.start, len(errors)


# ---- the run -------------------------------------------------------------------------------------

def describe(options: Options, files: list[Path]) -> dict[str, Any]:
    """What the output folder's units depend on: a rerun must be the same run."""
    return {"input": [{"path": str(f.resolve()), "bytes": f.stat().st_size, "modified": f.stat().st_mtime}
                      for f in files],
            "artifact": sha256_of(manifest_beside(options.artifact)), "shard_rows": options.shard_rows,
            "batch": options.batch, "pack": options.pack, "fields": options.fields, "id": options.id_column,
            "helper_args": options.helper_args, "truncate": options.truncate, "backend": options.backend}


def start(options: Options, run: dict[str, Any]) -> set[str]:
    """Make or reopen the output folder for `run` (describe's); returns the units already done."""
    try:
        (options.output / ERRORS).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {options.output}: cannot make a folder there ({err.strerror})") from None
    progress, done = options.output / PROGRESS, set()
    if progress.exists():
        try:
            kept = json.loads(progress.read_text())
            earlier, done = kept["run"], {str(name) for name in kept["done"]}
        except (ValueError, KeyError, TypeError):
            raise UserError(f"--output {options.output}: {PROGRESS} is unreadable; use an empty folder") from None
        if earlier != run:
            raise UserError(f"--output {options.output} holds the output of another run (other input, artifact or "
                            "options); use an empty folder")
    elif any(options.output.glob("part-*")) or any((options.output / ERRORS).iterdir()):
        raise UserError(f"--output {options.output} holds shards but no {PROGRESS}; use an empty folder")
    for stale in [*options.output.glob(".*.incoming"), *(options.output / ERRORS).glob(".*.incoming")]:
        stale.unlink()  # a write that was cut short
    done |= {p.stem for p in options.output.glob("part-*.parquet")}  # written before the progress file said so
    save_progress(options.output, run, done)
    return done


def save_progress(output: Path, run: dict[str, Any], done: set[str]) -> None:
    scratch = output / f".{PROGRESS}.incoming"
    scratch.write_text(json.dumps({"run": run, "done": sorted(done)}, indent=1))
    os.replace(scratch, output / PROGRESS)


@dataclass
class Tally:
    total: int
    skipped: int  # done by an earlier run
    rows: int = 0
    failures: int = 0
    began: float = field(default_factory=time.perf_counter)

    def show(self, final: bool = False) -> None:
        seconds = time.perf_counter() - self.began
        rate = self.rows / seconds if seconds > 0 else 0.0
        if final:
            print(f"predicted {self.rows} rows in {seconds:.1f} s ({rate:.1f} rows/s), {self.failures} failures"
                  + (f", {self.skipped} rows done by an earlier run" if self.skipped else ""))
        elif sys.stderr.isatty():
            left = self.total - self.skipped - self.rows
            eta = f", {left / rate:.0f} s to go" if rate else ""
            print(f"\r{self.rows + self.skipped} of {self.total} rows, {rate:.1f} rows/s{eta}   ", end="",
                  file=sys.stderr, flush=True)


def predict(options: Options) -> int:
    """Run `options`; returns the exit status (1: bad rows under --strict)."""
    if options.batch < 1 or options.shard_rows < 1 or options.workers < 1:
        raise UserError("--batch, --shard-rows and --workers must be 1 or more")
    if options.engine not in ENGINES:
        raise UserError(f"--engine {options.engine!r}: choose one of {', '.join(ENGINES)}")
    if options.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("--engine ray needs Ray Data: pip install 'megatron-deploy[ray]'")
    if options.engine == "ray" and options.ray_address not in (None, "auto"):
        check_reachable(options.ray_address)
    files = input_files(options.input)
    if importlib.util.find_spec("pyarrow") is None:  # the shards are Parquet
        raise UserError("writing Parquet needs pyarrow: pip install 'megatron-deploy[predict]'")
    _open(options)  # the artifact verified, and its helper known, before any row is read
    run = describe(options, files)  # once: the artifact's hash is read once, the same for every save
    done = start(options, run)
    every = list(units(files, options.shard_rows))
    todo = [unit for unit in every if unit.name not in done]
    tally = Tally(total=sum(u.stop - u.start for u in every), skipped=sum(u.stop - u.start for u in every
                                                                             if u.name in done))

    def finished(name: str, rows: int, failures: int) -> None:
        tally.rows, tally.failures = tally.rows + rows, tally.failures + failures
        done.add(name)
        save_progress(options.output, run, done)
        tally.show()

    try:
        answer_all(options, todo, finished)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {tally.rows + tally.skipped} of {tally.total} rows are done and kept; the same "
              "command goes on from there", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a file gone: the units done stay done
        raise UserError(f"{err.filename or options.output}: {err.strerror or err}; {tally.rows + tally.skipped} "
                        f"of {tally.total} rows are done and kept; the same command goes on from there") from None
    if sys.stderr.isatty():
        print(file=sys.stderr)
    tally.show(final=True)
    return 1 if options.strict and tally.failures else 0


def answer_all(options: Options, todo: list[Unit], finished: Callable[[str, int, int], None]) -> None:
    """The units through this process, a pool of `--workers` processes, or Ray."""
    if options.engine == "ray":
        _open_no_more()  # each actor opens its own
        on_ray(options, todo, finished)
    elif options.workers == 1:
        for unit in todo:
            finished(*_work(unit, options.output))
    else:
        _open_no_more()  # each worker opens its own
        context = multiprocessing.get_context("spawn")  # no fork of a process holding engine threads
        share = max(1, len(os.sched_getaffinity(0)) // options.workers)
        with ProcessPoolExecutor(options.workers, context, initializer=_start_worker,
                                 initargs=(options, share)) as pool:
            running: set[Future] = set()
            for unit in todo:  # at most two units per worker in flight: memory stays bounded
                if len(running) >= 2 * options.workers:
                    finished_now, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished_now:
                        finished(*future.result())
                running.add(pool.submit(_work, unit, options.output))
            for future in running:
                finished(*future.result())


# ---- on a Ray cluster ----------------------------------------------------------------------------

class RayWorker:
    """One actor of Ray Data's pool: opens (and so verifies) the artifact once, then answers units."""

    def __init__(self, options: Options):
        _open(options, threads=1)  # the one CPU the actor holds
        self.output = options.output

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        names, rows, failures = [], [], []
        for index in range(len(batch["name"])):
            fields = {k: v.item() if isinstance(v := batch[k][index], np.generic) else v for k in UNIT_FIELDS}
            name, count, failed = _work(Unit(**fields), self.output)
            names.append(name)
            rows.append(count)
            failures.append(failed)
        return {"done": names, "rows": rows, "failures": failures}


UNIT_FIELDS = ("path", "file", "start", "stop", "offset", "length", "line")


def check_reachable(address: str) -> None:
    """Refuse an address where nothing listens: Ray would wait for it without end."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: give auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({err.strerror or err})") from None


def on_ray(options: Options, todo: list[Unit], finished: Callable[[str, int, int], None]) -> None:
    """The units through an actor pool of `--workers` actors, split by Ray Data (which restarts an actor
    that dies and gives its unit to another); the output folder must be one that every node writes."""
    import ray
    import ray.data

    # "local": a Ray instance of its own, not one that `ray start` left running on this machine
    ray.init(address=options.ray_address or "local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # the run's own lines say how far it is
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run's own line says how far it is
        items = [{"name": unit.name, **{k: getattr(unit, k) for k in UNIT_FIELDS}} for unit in todo]
        if not items:
            return
        answered = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            RayWorker, fn_constructor_args=(options,), batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=options.workers))
        for row in answered.iter_rows():
            finished(row["done"], int(row["rows"]), int(row["failures"]))
    finally:
        ray.shutdown()
