"""Scan a pool of images with an exported model into Parquet shards (no torch needed).

    python tools/scan.py MODEL.onnx SOURCE --out DIR [--engine local|ray] [--batch-size N]
        [--workers N] [--threads N] [--shard-size N] [--ray-address auto] [--window N]

SOURCE is a folder (searched recursively), a .jsonl manifest ({"image": path relative to
the manifest}) or a text file of paths (relative to the file). DIR gets
shards/shard-NNNNNN.parquet (one row per input, bad images as rows with an error) and
scan.json (settings and totals). Run the same command again to resume a killed scan:
finished shards are skipped. Needs `pip install waterdrop[scan]`.
"""

import argparse
import json
import sys
from pathlib import Path

from waterdrop.scan import ScanError, scan_local, scan_ray


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file written by tools/export.py")
    parser.add_argument("source", help="folder, .jsonl manifest or text file of paths")
    parser.add_argument("--out", required=True, help="output folder (shards/ and scan.json)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime run")
    parser.add_argument("--workers", type=int, help="local: decoding processes (default: CPUs); ray: actors")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (local default: CPUs; ray: 1 per actor)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="inputs per shard file")
    parser.add_argument("--ray-address", help="a running Ray cluster ('auto': the one this node joined)")
    parser.add_argument("--window", type=int, default=100_000, help="ray: inputs per Ray Data run")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args()
    common = {"batch_size": args.batch_size, "shard_size": args.shard_size, "progress": not args.quiet}
    try:
        if args.engine == "local":
            record = scan_local(args.model, args.source, args.out, workers=args.workers, threads=args.threads, **common)
        else:
            record = scan_ray(
                args.model,
                args.source,
                args.out,
                actors=args.workers,
                threads=args.threads or 1,
                window=args.window,
                address=args.ray_address,
                **common,
            )
    except (ScanError, ValueError, ImportError) as err:
        print(f"scan: {err}", file=sys.stderr)
        return 2
    run, whole = record["this_run"], record["all_shards"]
    print(json.dumps({"this_run": run, "all_shards": whole}))
    print(
        f"{run['seen']} images in {run['seconds']:.1f} s ({run['images_per_s']:.1f} img/s): {run['scored']} scored, "
        f"{run['errors']} errors; {run['shards_written']} shards written, {run['shards_skipped']} already done; "
        f"{whole['rows']} rows in {whole['shards']} shards under {Path(args.out) / 'shards'}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
