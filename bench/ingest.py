"""Ingestion throughput: images/s for 512x512 JPEG-compressed Ophthalmic Photography files.

Four measurements on the same export, in interleaved repeats (so machine noise hits all alike; medians
reported, plus ratios against the bare decoder):
  decode      read + validate + decode the DICOM (the floor: pydicom + JPEG decoder)
  process     decode + canonical image (crop, square, resize to 256) + content hash + PNG encode
  ingest_w1   the whole `vilref-client ingest` engine in one process into a fresh site: the above plus
              keyed hashing, atomic PNG writes with fsync, SQLite rows, report CSV, label extraction
              and linking
  ingest_w2   the same with two decoding worker processes (process start-up included)

The OP files are built from the real scikit-image fundus photograph (one study per file, with a
report each), the way tests/dicom_factory.py builds them.

    .venv/bin/python bench/ingest.py --n 64 --repeats 3

Prints JSON and writes bench/results/ingest.json (keys: images_per_s = ingest_w1 median wall-clock,
per-mode images_per_s, ratio_to_decode, pipeline_ratio = ingest_w1 / decode, and the same from CPU
time of this process, images_per_cpu_s / cpu_pipeline_ratio, which other jobs on a shared machine do
not distort).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from dicom_factory import write_jpeg_export  # noqa: E402

from vilref_fed.data.dicom import read_fundus_dicom  # noqa: E402
from vilref_fed.data.ingest import IngestOptions, discover_files, ingest, process_file  # noqa: E402
from vilref_fed.data.site import init_site  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="number of OP files")
    ap.add_argument("--size", type=int, default=512, help="side of the JPEG images")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ingest.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vilref-bench-ingest-"))
    try:
        export = work / "export"
        t0 = time.perf_counter()
        write_jpeg_export(export, args.n, size=args.size)
        build_s = time.perf_counter() - t0
        csv_rows = ["accession,report"] + [
            f'ACCQX{i:06d},"Moderate non-proliferative diabetic retinopathy, no macular oedema."'
            for i in range(args.n)
        ]
        (work / "reports.csv").write_text("\n".join(csv_rows) + "\n")
        files = discover_files([export])
        export_mb = sum(f.stat().st_size for f in files) / 1e6

        from vilref_fed.labels import get_extractor

        get_extractor()  # compile once, outside the timings (as in a long ingestion)
        secret = b"b" * 32
        site_probe = init_site(work / "probe", "probe")
        limits, rule = site_probe.config.read_limits(), site_probe.config.fundus_rule()
        site_probe.close()

        def decode() -> int:
            return sum(len(read_fundus_dicom(f)) for f in files)

        def process() -> int:
            return sum(len(process_file(str(f), secret, 256, limits, rule).frames) for f in files)

        def run_ingest(workers: int) -> int:
            d = work / f"site-{workers}-{time.monotonic_ns()}"
            with init_site(d, "bench") as site:
                r = ingest(
                    site, IngestOptions(dicom=[export], reports=[work / "reports.csv"], workers=workers)
                )
            assert r.status["reports_linked"] == args.n
            shutil.rmtree(d)
            return r.run.accepted

        modes = {
            "decode": decode,
            "process": process,
            "ingest_w1": lambda: run_ingest(1),
            "ingest_w2": lambda: run_ingest(2),
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        decode()  # warm the page cache and the decoders
        for r in range(args.repeats):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for m in order:
                t, c = time.perf_counter(), time.process_time()
                n = modes[m]()
                times[m].append(time.perf_counter() - t)
                cpu[m].append(time.process_time() - c)
                assert n == args.n, (m, n)
        med = {m: statistics.median(v) for m, v in times.items()}
        ips = {m: args.n / s for m, s in med.items()}
        # CPU time of this process: independent of other jobs on a shared machine (not meaningful for
        # ingest_w2, whose decoding happens in child processes).
        cpu_ips = {m: args.n / statistics.median(cpu[m]) for m in ("decode", "process", "ingest_w1")}
        result = {
            "benchmark": "ingest",
            "images": args.n,
            "image_size": args.size,
            "syntax": "JPEG Baseline, YBR_FULL_422, Ophthalmic Photography 8 Bit",
            "export_mb": round(export_mb, 2),
            "repeats": args.repeats,
            "images_per_s": round(ips["ingest_w1"], 2),
            "images_per_s_by_mode": {m: round(v, 2) for m, v in ips.items()},
            "ratio_to_decode": {m: round(ips[m] / ips["decode"], 3) for m in ips},
            "pipeline_ratio": round(ips["ingest_w1"] / ips["decode"], 3),
            "images_per_cpu_s": {m: round(v, 2) for m, v in cpu_ips.items()},
            "cpu_pipeline_ratio": round(cpu_ips["ingest_w1"] / cpu_ips["decode"], 3),
            "workers_speedup": round(ips["ingest_w2"] / ips["ingest_w1"], 3),
            "seconds": {m: [round(x, 3) for x in v] for m, v in times.items()},
            "build_export_s": round(build_s, 2),
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "loadavg_1m": round(os.getloadavg()[0], 2),
            },
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
