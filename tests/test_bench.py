"""`python -m exporter bench` on tiny artifacts: figures are printed and written, not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.delivery import bench
from exporter.cli import main
from runtime import openvino_backend

CPU_BACKENDS = ("openvino/CPU",) if openvino_backend.usable() is None else ()  # beside ONNX Runtime's


def test_bench_encoder_vs_pytorch(built, tmp_path, capsys):
    manifest = built["qa"][0]
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", str(manifest), "--batch", "1,2", "--seq", "8,16", "--iterations", "2", "--warmup", "1",
                 "--vs-pytorch", "--json", str(out), "--plot", str(picture)]) == 0
    printed = capsys.readouterr().out
    assert "p50 ms" in printed and "pytorch eager" in printed and "onnxruntime/CPU" in printed
    report = json.loads(out.read_text())
    assert {"machine", "versions", "settings", "results"} <= set(report)
    machine, cpuinfo = report["machine"], Path("/proc/cpuinfo").read_text()
    assert machine["cpu"] and machine["cpu"] in cpuinfo  # the CPU by name, and the flags that decide speed
    assert machine["cpu_flags"] == [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                                "amx_int8") if f" {f} " in f" {cpuinfo.split('flags')[1].splitlines()[0]} "]
    assert machine["physical_cores"] >= 1 and machine["torch_threads"] >= 1
    assert {"torch", "onnx", "onnxruntime"} <= set(report["versions"])
    rows = report["results"]
    assert {(r["backend"], r["batch"], r["sequence"]) for r in rows} == {
        (b, n, s) for b in ("onnxruntime/CPU", *CPU_BACKENDS, "pytorch eager") for n in (1, 2) for s in (8, 16)}
    for row in rows:
        assert row["p50_ms"] > 0 and row["sequences_per_s"] > 0 and row["peak_rss_mib"] > 0
        assert (row["speedup"] is None) == (row["backend"] == "pytorch eager")
        # OpenVINO computes in bf16 on a CPU with native bf16: held to the bf16 tolerance
        floor = 0.998 if row["precision"] == "bf16" else 0.99999
        assert row["cosine"] is None if row["backend"] == "pytorch eager" else row["cosine"] > floor, row
    assert "cos vs pt" in printed and f"({', '.join(machine['cpu_flags'])}; " in printed  # the CPU's flags
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_defaults_to_a_range_of_lengths_and_refuses_one(built, tmp_path, capsys):
    manifest, picture, out = built["qa"][0], tmp_path / "range.png", tmp_path / "range.json"
    assert main(["bench", str(manifest), "--iterations", "1", "--warmup", "0", "--plot", str(picture),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert sorted({r["sequence"] for r in rows}) == [8, 16, 32, 48]  # max 48
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = bench.latency_figure([bench.Figures(**row) for row in rows]).axes[0]
    assert axes.get_xscale() == "log"  # doubling lengths evenly spaced, each labelled
    assert [t.get_text() for t in axes.get_xticklabels()] == ["8", "16", "32", "48"]
    capsys.readouterr()
    assert main(["bench", str(manifest), "--seq", "16", "--plot", str(tmp_path / "one.png")]) == 2
    assert "one length" in capsys.readouterr().err and not (tmp_path / "one.png").exists()


def test_bench_int8_measures_its_agreement_with_pytorch(built_int8, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", str(built_int8["qa"][0]), "--seq", "16", "--iterations", "1", "--vs-pytorch",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    for backend in ("onnxruntime/CPU", *CPU_BACKENDS):  # OpenVINO: the Q/DQ graph
        ours = next(r for r in rows if r["backend"] == backend)
        assert ours["precision"] == "int8" and 0.99 < ours["cosine"] < 1 - 1e-7  # close, yet not the fp32 graph


def test_bench_generation(built, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(built["causal-lm"][0]), "--seq", "8", "--new-tokens", "4", "--iterations", "2",
                 "--vs-pytorch", "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert {"onnxruntime/CPU", "pytorch no cache", "pytorch kv cache", "transformers generate()"} <= set(rows)
    ours = rows["onnxruntime/CPU"]
    assert ours["first_token_ms"] > 0 and ours["per_token_ms"] > 0 and ours["speedup"] > 0
    assert ours["tokens_per_s"] > 0 and rows["transformers generate()"]["first_token_ms"] is None
    assert "1st tok ms" in capsys.readouterr().out


def test_bench_bad_input(built, capsys):
    assert main(["bench", str(built["qa"][0]), "--seq", "4096"]) == 2
    assert "outside the artifact's limits" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["bench", str(built["qa"][0]), "--batch", "one"])
    assert exit.value.code == 2 and "numbers separated by commas" in capsys.readouterr().err
