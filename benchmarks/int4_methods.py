"""Which int4 settings keep the trained demo heads' task accuracy best?

Builds every head (or --heads) as int4 with each setting (method, symmetric or not, block size) and
prints, per head and setting, the task metric of PyTorch fp32 and of the int4 graph as first quantized
(before any repair), the points lost, the products the repair moved, the graph's size, and the time
of one call (batch 1, 128 tokens; a causal LM's decode step after 128).

    python benchmarks/int4_methods.py [--heads qa,nsp] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import time
from pathlib import Path

from calibration_methods import built, comparison, first_calibration, summarize
from exporter.pipeline.build import BuildOptions
from exporter.pipeline.recipes import RECIPES_DIR
from runtime import Session, backend_choice, feeds
from runtime.manifest import Manifest

SETTINGS = {"rtn symmetric 32": 'method = "rtn"\nsymmetric = true\nblock_size = 32',
            "rtn asymmetric 32": 'method = "rtn"\nsymmetric = false\nblock_size = 32',
            "rtn symmetric 128": 'method = "rtn"\nsymmetric = true\nblock_size = 128',
            "hqq 32": 'method = "hqq"\nsymmetric = false\nblock_size = 32'}


def call_ms(path: Path) -> float:
    """Median ms of one call on ONNX Runtime, as backend="auto" times a candidate."""
    session = Session(path, backend="onnxruntime")
    graph = backend_choice.timed_graph(session.manifest)
    feed = feeds.feed(session.manifest, graph, backend_choice.timed_sizes(session.manifest, graph))
    return backend_choice.milliseconds(session._backend, graph, feed)


def main() -> None:
    args, out, host = comparison(__doc__, "int4-")
    rows = []
    for head in args.heads.split(","):
        for number, (setting, section) in enumerate(SETTINGS.items()):
            recipe = out / f"{head}-{number}.toml"  # the head's recipe with this [int4]
            recipe.write_text((RECIPES_DIR / f"{head}.toml").read_text() + f"\n[int4]\n{section}\n")
            name, start = f"{head}-{number}", time.perf_counter()
            path = built(BuildOptions(head=head, precision="int4", recipe=str(recipe), out=out, name=name))
            seconds = time.perf_counter() - start
            manifest = Manifest.load(path)
            metric = first_calibration(manifest)
            reference = metric.pop(manifest.accuracy["reference"])
            size = sum(f.stat().st_size for f in path.parent.glob(f"{name}.*.onnx*")) + \
                sum(f.stat().st_size for f in path.parent.glob(f"{name}.onnx*"))
            rows.append({"head": head, "setting": setting, "metric": manifest.accuracy["metric"], "fp32": reference,
                         "int4": metric["onnxruntime"], "worst_drop": round(reference - min(metric.values()), 2),
                         "moved": len(manifest.quantization.get("repaired_layers", [])),
                         "passed": manifest.validation["passed"], "mb": round(size / 1e6, 2),
                         "call_ms": round(call_ms(path), 2) if manifest.validation["passed"] else None,
                         "build_s": round(seconds, 1)})
            r = rows[-1]
            print(f"{head:<24} {setting:<18} {r['metric']:<20} fp32 {reference:6.2f}  int4 {r['int4']:6.2f}  "
                  f"worst drop {r['worst_drop']:5.2f}  moved {r['moved']}  {r['mb']:.2f} MB  call {r['call_ms']} ms  "
                  f"build {r['build_s']:.0f} s", flush=True)
    summarize(rows, "setting", list(SETTINGS), "moved", args.json, host)

if __name__ == "__main__":
    main()
