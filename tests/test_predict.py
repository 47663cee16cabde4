"""`python -m exporter predict`: an artifact over a corpus, streamed into Parquet shards, the same
answers as runtime.Session's whatever the worker count, resumable after a kill with nothing lost."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, assert_same_result
from exporter.cli import main
from exporter.delivery import predict as predict_module
from exporter.delivery.predict import ANSWER_COLUMNS, Tally
from runtime import Session

EVAL = ROOT / "recipes" / "data" / "eval"


def rows_for(head: str) -> list[dict]:
    """Rows with the fields the head's helper takes, from the demo's evaluation sets."""
    if head == "causal-lm":  # short prompts: the tiny artifact keeps 16 tokens of past
        return [{"prompt": " ".join(json.loads(line)["text"].split()[:3])}
                for line in (EVAL / "causal-lm.jsonl").read_text().splitlines()[:12]]
    source = "base" if head == "base" else head
    return [json.loads(line) for line in (EVAL / f"{source}.jsonl").read_text().splitlines()[:40]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def shards(folder: Path) -> pa.Table:
    files = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def alone(session: Session, head: str, row: dict):
    """What Session answers for one row asked alone."""
    if head == "qa":
        return session.answer(row["question"], row["context"])
    if head == "causal-lm":
        return session.generate(row["prompt"], max_new_tokens=4)
    helper = session.head.helpers[0]
    return getattr(session, helper)(row["text"])


def answer_of(helper: str, output_row: dict):
    columns = ANSWER_COLUMNS[helper]
    if columns == ("embedding",):
        return np.asarray(output_row["embedding"], dtype=np.float32)
    return output_row[columns[0]] if len(columns) == 1 else {k: output_row[k] for k in columns}


@pytest.mark.parametrize("head", ["qa", "sequence-classification", "token-classification", "base", "causal-lm"])
def test_predict_answers_as_the_session_does_with_one_or_two_workers(built, head, tmp_path, capsys):
    artifact = built[head][0]
    rows = rows_for(head)
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = {}
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        code = main(["predict", str(artifact), "--input", str(data), "--output", str(out), "--batch", "3",
                     "--shard-rows", "7", "--workers", str(workers),
                     *(["--helper-args", '{"max_new_tokens": 4}'] if head == "causal-lm" else [])])
        printed = capsys.readouterr().out
        assert code == 0 and f"predicted {len(rows)} rows" in printed and "0 failures" in printed, printed
        outputs[workers] = shards(out)
        assert sorted(p.name for p in out.glob("part-*"))[0] == "part-00000-000000000000-000000000007.parquet"
    # The same bytes whatever the worker count: batches depend on the unit alone
    assert outputs[1].equals(outputs[2])
    session = Session(artifact)
    answered = outputs[1].to_pylist()
    assert len(answered) == len(rows)
    helper = session.head.helpers[0]
    for row, output_row in zip(rows, answered):  # input columns kept (renamed where an answer's has the name)
        assert {k: output_row[f"input_{k}" if k in ANSWER_COLUMNS[helper] else k] for k in row} == row
        assert_same_result(answer_of(helper, output_row), alone(session, head, row))


def test_with_batches_of_one_each_row_is_answered_exactly_as_alone(built, tmp_path):
    rows = rows_for("base")[:12]
    out = tmp_path / "out"
    assert main(["predict", str(built["base"][0]), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)),
                 "--output", str(out), "--batch", "1"]) == 0
    session = Session(built["base"][0])
    for row, output_row in zip(rows, shards(out).to_pylist(), strict=True):
        assert np.array_equal(np.asarray(output_row["embedding"], np.float32), session.embed(row["text"]))


def test_bad_rows_go_to_the_errors_shard_and_strict_exits_1(built, tmp_path, capsys):
    good = rows_for("qa")[:5]
    bad = [{"question": 5, "context": "x"}, "not json", {"context": "no question"}, "[1, 2]",
           {"question": "who?", "context": "  "}]  # refused by the helper itself, in the middle of a batch
    data = write_jsonl(tmp_path / "in.jsonl", [*good[:2], *bad, *good[2:]])
    out = tmp_path / "out"
    args = ["predict", str(built["qa"][0]), "--input", str(data), "--output", str(out), "--batch", "4",
            "--shard-rows", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "predicted 10 rows" in printed and "5 failures" in printed, printed
    errors = shards(out / "_errors").to_pylist()
    reasons = {e["id"]: e["reason"] for e in errors}
    assert sorted(reasons) == ["0:2", "0:3", "0:4", "0:5", "0:6"]
    assert reasons["0:2"] == "field 'question' must be a text" and "not JSON" in reasons["0:3"]
    assert reasons["0:4"] == "no field 'question'" and "not a JSON object" in reasons["0:5"]
    assert reasons["0:6"] == "question and context must both be non-empty"
    # Units [2, 4) and [4, 6) hold only bad rows: no answer shard, yet done
    assert [p.name[5:-8] for p in sorted(out.glob("part-*"))] == ["00000-000000000000-000000000002",
                                                                 "00000-000000000006-000000000008",
                                                                 "00000-000000000008-000000000010"]
    # The folder reads as one dataset of the answers (the progress file and _errors/ are skipped)
    assert pq.read_table(out).equals(shards(out)) and shards(out).num_rows == 5
    assert main(args) == 0 and "predicted 0 rows" in capsys.readouterr().out  # all done already
    # --strict: the same run, exit 1 (a fresh folder: the output folder remembers the run's options)
    assert main([*args[:-6], "--output", str(tmp_path / "strict"), "--strict"]) == 1


def test_a_text_too_long_is_a_bad_row_unless_truncated(built, tmp_path, capsys):
    artifact = built["sequence-classification"][0]
    session = Session(artifact)
    long = " ".join(["word"] * (2 * session.max_length))
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "a short one"}, {"text": long}])
    assert main(["predict", str(artifact), "--input", str(data), "--output", str(tmp_path / "refused")]) == 0
    assert "1 failures" in capsys.readouterr().out
    assert "longer than this artifact's" in shards(tmp_path / "refused" / "_errors").column("reason")[0].as_py()
    assert main(["predict", str(artifact), "--input", str(data), "--output", str(tmp_path / "cut"), "--truncate"]) == 0
    answered = shards(tmp_path / "cut").to_pylist()
    assert [row["text"] for row in answered] == ["a short one", long]
    cut = Session(artifact, truncate=True)
    assert [{"label": r["label"], "score": r["score"]} for r in answered] == cut.classify(["a short one", long])


def test_hostile_lines_are_bad_rows_read_with_bounded_memory(built, tmp_path, capsys, monkeypatch):
    good = rows_for("sequence-classification")[:3]
    huge = "x" * (predict_module.MAX_LINE + 10)  # no line end for 16 MiB: passed over, never held
    data = write_jsonl(tmp_path / "in.jsonl", [good[0], huge, "[" * 100_000 + "]" * 100_000, good[1], good[2]])
    out = tmp_path / "out"
    assert main(["predict", str(built["sequence-classification"][0]), "--input", str(data), "--output",
                 str(out)]) == 0
    assert "predicted 5 rows" in capsys.readouterr().out
    reasons = {e["id"]: e["reason"] for e in shards(out / "_errors").to_pylist()}
    assert reasons == {"0:1": "line 2 is longer than 16 MiB", "0:2": "line 3 is nested too deeply"}
    assert shards(out).column("text").to_pylist() == [g["text"] for g in good]
    # A unit ends early where its lines pass UNIT_BYTES (here 100 bytes), and rows are numbered on
    monkeypatch.setattr(predict_module, "UNIT_BYTES", 100)
    lines = write_jsonl(tmp_path / "small.jsonl", [{"text": "x" * 60}] * 5)
    cut = list(predict_module.units([lines], 4))
    assert [(u.start, u.stop, u.line) for u in cut] == [(0, 2, 1), (2, 4, 3), (4, 5, 5)]
    assert [len(u.rows()) for u in cut] == [2, 2, 1]


def test_an_input_column_of_mixed_types_is_kept_as_json_text(built, tmp_path):
    rows = [{**row, "meta": meta} for row, meta in zip(rows_for("sequence-classification"), [1, "x", [2], None])]
    out = tmp_path / "out"
    assert main(["predict", str(built["sequence-classification"][0]), "--input",
                 str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out)]) == 0
    table = shards(out)
    assert table.column("meta").to_pylist() == ["1", '"x"', "[2]", None]
    assert table.column("text").to_pylist() == [row["text"] for row in rows]  # the others keep their type


def test_an_output_that_cannot_be_a_folder_is_one_line_and_exit_2(built, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", rows_for("qa")[:2])
    (tmp_path / "taken").write_text("a file")
    assert main(["predict", str(built["qa"][0]), "--input", str(data), "--output", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "cannot make a folder there" in err and len(err.strip().splitlines()) == 1


def test_parquet_input_with_other_column_names_and_an_id_column(built, tmp_path, capsys):
    rows = rows_for("sequence-classification")[:9]
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"key": [f"r{i}" for i in range(len(rows))], "review": [r["text"] for r in rows]}), data,
                   row_group_size=2)  # units of 5 rows straddle three row groups
    out = tmp_path / "out"
    assert main(["predict", str(built["sequence-classification"][0]), "--input", str(data), "--output", str(out),
                 "--field", "text=review", "--id", "key", "--shard-rows", "5"]) == 0
    assert len(list(out.glob("part-*"))) == 2
    table = shards(out)
    assert table.column_names == ["key", "label", "score"] and table.column("key").to_pylist() == \
        [f"r{i}" for i in range(len(rows))]
    session = Session(built["sequence-classification"][0])
    assert_same_result([{"label": r["label"], "score": r["score"]} for r in table.to_pylist()],
                       session.classify([r["text"] for r in rows]))


def test_helper_args_the_helper_does_not_take_are_refused_before_any_work(built, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", rows_for("qa")[:3])
    out = tmp_path / "out"
    code = main(["predict", str(built["qa"][0]), "--input", str(data), "--output", str(out),
                 "--helper-args", '{"pooling": "mean"}'])
    assert code == 2 and "answer takes no pooling; it takes top_k, " in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.jsonl", "no such file or folder"),
    (lambda p: (p / "in.csv").write_text("a,b\n") and p / "in.csv", "not a .jsonl or .parquet file"),
    (lambda p: (p / "in.parquet").write_text("not parquet") and p / "in.parquet", "cannot be read as parquet"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .jsonl or .parquet files"),
])
def test_a_bad_input_is_one_line_and_exit_2_before_any_work(built, tmp_path, capsys, make, message):
    out = tmp_path / "out"
    code = main(["predict", str(built["qa"][0]), "--input", str(make(tmp_path)), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_output_folder_of_another_run_is_refused(built, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", rows_for("qa")[:3])
    out = tmp_path / "out"
    assert main(["predict", str(built["qa"][0]), "--input", str(data), "--output", str(out)]) == 0
    write_jsonl(data, rows_for("qa")[:4])  # the input changed
    assert main(["predict", str(built["qa"][0]), "--input", str(data), "--output", str(out)]) == 2
    assert "holds the output of another run" in capsys.readouterr().err


def children(pid: int) -> list[int]:
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
            if p.read_text().rsplit(")", 1)[1].split()[1] == str(pid)]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_mid_way_and_started_again_ends_as_an_uninterrupted_one(built, tmp_path, workers):
    rows = [{**row, "n": i} for i, row in enumerate(rows_for("qa") * 40)]  # 1600 rows, 100 shards of 16
    data = write_jsonl(tmp_path / "in.jsonl", rows)

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "exporter", "predict", str(built["qa"][0]), "--input", str(data),
                "--output", str(out), "--shard-rows", "16", "--batch", "4", "--workers", str(workers)]

    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, cwd=ROOT, timeout=300)
    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    workers_of_the_run = children(process.pid)
    assert workers == 1 or len(workers_of_the_run) >= 2  # its pool's processes (and multiprocessing's tracker)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20  # its workers end with it
    while any(Path(f"/proc/{pid}").exists() for pid in workers_of_the_run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers_of_the_run)
    done_before = len(list(out.glob("part-*.parquet")))
    assert 5 <= done_before < 100, done_before  # killed mid-way
    again = subprocess.run(command(out), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and f"{done_before * 16} rows done by an earlier run" in again.stdout, again.stdout
    whole, resumed = shards(tmp_path / "whole"), shards(out)
    assert resumed.equals(whole)
    assert sorted(resumed.column("n").to_pylist()) == list(range(len(rows)))  # each row exactly once
    assert not list(out.glob(".*incoming"))


def test_a_terminal_sees_rows_done_of_the_total_the_rate_and_the_time_to_go(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    tally = Tally(total=1000, skipped=200, began=time.perf_counter() - 10)
    tally.rows, tally.failures = 300, 2
    tally.show()
    line = terminal.getvalue()
    assert line.startswith("\r500 of 1000 rows, 3") and " rows/s, 1" in line and " s to go" in line, line
    tally.show(final=True)
    assert capsys.readouterr().out.startswith("predicted 300 rows in 10.0 s (30.0 rows/s), 2 failures, 200 rows "
                                              "done by an earlier run")
