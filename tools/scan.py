"""Scan a pool of images with an exported model into Parquet shards (no torch needed).

    python tools/scan.py MODEL.onnx SOURCE [--out DIR] [--engine local|ray] [--batch-size N]
        [--workers N] [--threads N] [--shard-size N] [--ray-address auto] [--window N]
        [--ray-decode inside|tasks] [--ray-decode-cpus C] [--ray-actor-cpus C]
        [--embeddings [float16|float32]] [--since EARLIER_SCAN ...] [--quiet]

SOURCE is a folder (searched recursively), a .jsonl manifest ({"image": path relative to
the manifest}) or a text file of paths (relative to the file). DIR (default:
scans/<source name> beside MODEL, i.e. in its run folder) gets shards/shard-NNNNNN.parquet
(one row per input, bad images as rows with an error) and scan.json (settings and totals).
Run the same command again to resume a killed scan: finished shards are skipped. With
--embeddings every row also gets the model's image embedding (an ``embedding`` column, float16
unless float32 is given), for tools/search_pool.py to index. With --since (earlier scan folders
of the same model) only files that differ from their path's newest row there (size,
modification time) are scored: new, changed and restored files (earlier error rows of unchanged
files stand unless --retry-errors); removed.parquet lists the files they hold that SOURCE no
longer has, and scan.json counts both. The newest scan's row holds for a path: together the
scans cover the pool. Needs `pip install waterdrop[scan]`.

Exit codes: 0 every image scored; 1 the scan finished with error rows (counted on stderr);
2 a bad argument (a missing source, a file that is not an ONNX model, a DIR holding another
scan): nothing scanned.
"""

import json
import sys
from pathlib import Path

from waterdrop import cli
from waterdrop.scan import ScanError, scan_local, scan_ray


def main() -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("model", help="ONNX file written by tools/export.py")
    parser.add_argument("source", help="folder, .jsonl manifest or text file of paths")
    parser.add_argument("--out", help="output folder (shards/ and scan.json; default: scans/<source name> in the "
                        "model's folder)")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local processes, or Ray Data (this machine or a cluster)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per onnxruntime run")
    parser.add_argument("--workers", type=int, help="local: decoding processes (default: CPUs); ray: actors")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (local default: CPUs; ray: 1 per actor)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="inputs per shard file")
    parser.add_argument("--ray-address", help="a running Ray cluster ('auto': the one this node joined)")
    parser.add_argument("--window", type=int, default=100_000, help="ray: inputs per Ray Data run")
    parser.add_argument("--ray-decode", choices=["inside", "tasks"], default="inside",
                        help="ray: decode inside the scoring actors (default), or in a stage of Ray tasks before them "
                        "(the layout an accelerator would need)")
    parser.add_argument("--ray-decode-cpus", type=float, default=1.0,
                        help="ray, --ray-decode tasks: logical CPUs a decoding task reserves")
    parser.add_argument("--ray-actor-cpus", type=float,
                        help="ray: logical CPUs a scoring actor reserves (default: --threads; with --ray-decode tasks, "
                        "fewer lets decoding share the actors' cores)")
    parser.add_argument("--embeddings", nargs="?", const="float16", choices=["float16", "float32"],
                        help="also write each image's embedding (default value type: float16)")
    parser.add_argument("--since", nargs="+", metavar="EARLIER_SCAN",
                        help="earlier scan folders of this model: score only what they have not")
    parser.add_argument("--retry-errors", action="store_true",
                        help="with --since: score again files whose earlier row is an error")
    args = cli.start(parser.parse_args())
    common = {"batch_size": args.batch_size, "shard_size": args.shard_size, "embeddings": args.embeddings,
              "since": args.since, "retry_errors": args.retry_errors, "progress": not args.quiet}
    try:
        cli.check_exists([args.source, *(args.since or [])], "source or earlier scan")
        cli.check_onnx_file(args.model)
        args.out = args.out or cli.run_folder(args.model) / "scans" / (Path(args.source).resolve().stem or "pool")
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
                decode=args.ray_decode,
                decode_cpus=args.ray_decode_cpus,
                actor_cpus=args.ray_actor_cpus,
                **common,
            )
    except (ScanError, ValueError, ImportError) as err:
        print(f"scan: {err}", file=sys.stderr)
        return cli.EXIT_USAGE
    run, whole = record["this_run"], record["all_shards"]
    print(json.dumps({"this_run": run, "all_shards": whole}))
    print(
        f"{run['seen']} images in {run['seconds']:.1f} s ({run['images_per_s']:.1f} img/s): {run['scored']} scored, "
        f"{run['errors']} errors; {run['shards_written']} shards written, {run['shards_skipped']} already done; "
        f"{whole['rows']} rows in {whole['shards']} shards under {Path(args.out) / 'shards'}"
        + (f"; {run['skipped_as_scored_before']} files scored before as they are, {run['removed_since']} gone since "
           "(removed.parquet)" if args.since else ""),
        file=sys.stderr,
    )
    return cli.EXIT_PARTIAL if run["errors"] else cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
