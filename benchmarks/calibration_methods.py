"""Which int8 calibration method keeps the trained demo heads' task accuracy best?

Builds every head (or --heads) as int8 with each method and prints, per head and method, the task
metric of PyTorch fp32 and of both int8 forms as first calibrated (before any repair), the points lost,
and how many layers the repair had to keep in float.

    python benchmarks/calibration_methods.py [--heads qa,nsp] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from exporter.delivery.bench import machine
from exporter.pipeline.build import BuildOptions, ValidationFailed, build
from exporter.precision.int8 import METHODS
from runtime.heads import HEADS
from runtime.manifest import Manifest


def first_calibration(manifest: Manifest) -> dict[str, float]:
    """Each form's metric as int8 first came out of calibration (before the repair, if any)."""
    steps = manifest.quantization.get("repair")
    if steps:
        return steps[0]["metric"]
    return {form: scores[manifest.accuracy["metric"]] for form, scores in manifest.accuracy["results"].items()}


def comparison(description: str, prefix: str) -> tuple[argparse.Namespace, Path, dict[str, Any]]:
    """The command line of a comparison over the demo heads, its output folder, and the machine (printed)."""
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    host = machine()
    print(f"{host['cpu']} ({', '.join(host['cpu_flags'])}), {host['cores']} cores")
    return args, args.out or Path(tempfile.mkdtemp(prefix=prefix)), host


def built(options: BuildOptions) -> Path:
    """The manifest of the artifact `options` build, passed or failed."""
    try:
        return build(options, log=lambda _: None)
    except ValidationFailed:
        return Path(options.out) / f"{options.name}.failed" / f"{options.name}.json"


def main() -> None:
    args, out, host = comparison(__doc__, "calibration-")
    rows = []
    for head in args.heads.split(","):
        for method in METHODS:
            name, start = f"{head}-{method}", time.perf_counter()
            manifest = Manifest.load(built(BuildOptions(head=head, precision="int8", calibration_method=method,
                                                        out=out, name=name, backend="onnxruntime")))
            metric = first_calibration(manifest)
            reference = metric.pop(manifest.accuracy["reference"])
            rows.append({"head": head, "method": method, "metric": manifest.accuracy["metric"], "fp32": reference,
                         **{form: value for form, value in metric.items()},
                         "worst_drop": round(reference - min(metric.values()), 2),
                         "repaired_layers": len(manifest.quantization.get("repaired_layers", [])),
                         "passed": manifest.validation["passed"], "seconds": round(time.perf_counter() - start, 1)})
            r = rows[-1]
            print(f"{head:<24} {method:<11} {r['metric']:<20} fp32 {reference:6.2f}  int8 dynamic "
                  f"{r['onnxruntime']:6.2f}  q/dq {r['onnxruntime q/dq']:6.2f}  worst drop {r['worst_drop']:5.2f}  "
                  f"repaired {r['repaired_layers']}  {r['seconds']:.0f} s", flush=True)
    summarize(rows, "method", list(METHODS), "repaired_layers", args.json, host)


def summarize(rows: list[dict[str, Any]], key: str, choices: list[str], repaired: str, json_path: Path | None,
              host: dict[str, Any]) -> None:
    """Per choice: the mean and largest worst drop over the heads, and what the repairs moved; the rows
    with the machine to `json_path`."""
    print()
    for choice in choices:
        mine = [r for r in rows if r[key] == choice]
        print(f"{choice:<18} mean worst drop {sum(r['worst_drop'] for r in mine) / len(mine):5.2f} points, "
              f"max {max(r['worst_drop'] for r in mine):5.2f}, {repaired.replace('_', ' ')} "
              f"{sum(r[repaired] for r in mine)}")
    if json_path:
        json_path.write_text(json.dumps({"machine": host, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
