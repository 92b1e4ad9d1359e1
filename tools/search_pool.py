"""Search a pool by example: index its scan's embeddings, find images like a few seeds, and
group its near duplicates (no torch needed).

    python tools/search_pool.py build SCAN [SCAN ...] --index DIR [--memory-gib 4]
    python tools/search_pool.py query --index DIR --model MODEL.onnx SEED [SEED ...] [--top 200]
        [--rank-by mean|max] [--copy-similarity 0.95] [--nprobe N] [--out DIR]
    python tools/search_pool.py query --index DIR --model MODEL.onnx --manifest M --label L [--label L2]
    python tools/search_pool.py dedupe --index DIR [--similarity 0.95] [--no-phash] [--out DIR]

build: SCAN folders were written by ``tools/scan.py MODEL POOL --embeddings``. The first build
chooses the index from the pool's size (or --expected-vectors, when later scans will add more)
and --memory-gib: exact up to 250,000 vectors, else compressed (see waterdrop/search/index.py).
A later build with the same DIR adds only the shards it has not indexed (a scan that grew, or
further scans of new images; a scan given twice, moved or rerun into another folder is
indexed once), so run it after every scan; growth beyond --memory-gib is refused (rebuild
into a new DIR). Only shards that exist are indexed: those of a running or interrupted scan
are complete.

query: the seeds are image files or folders (an undecodable seed is named and left out), or
the rows of a JSONL manifest with any of the --label labels. MODEL must be the model whose
embedding built the index (refused otherwise). Candidates are ranked by cosine similarity to
the seeds' mean embedding (``--rank-by max``: to the nearest seed, for seeds of several looks);
a pool image that is a copy of a seed is left out, and copies of a better-ranked candidate
are folded into it (``--copy-similarity``). Writes into --out (default: DIR/queries/query-N):
candidates.csv and candidates.parquet (rank, path, similarity, nearest_seed, copies,
copy_paths), contact_sheet.png (the first 64), to_label.jsonl (a manifest of the candidates,
ready for tools/label_studio.py export) and summary.json.

dedupe: every vector's neighbours at or above --similarity through the index's range search,
joined into groups (no pairwise comparison of the pool). Writes duplicates.csv (group, path,
keep: the first of each group; phash_distance: bits between its pHash and the kept image's,
the check of tools/clean_data.py, so a group pHash would not find stands out) and summary.json.

Exit codes: 0 done; 1 done, with undecodable seeds left out; 2 a bad argument (no usable seed,
an index of another model, a scan without embeddings): nothing written.
"""

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from waterdrop import cli
from waterdrop.imageio import ImageDecodeError, decoded_images
from waterdrop.records import parse_manifest
from waterdrop.search.index import GiB, PoolIndex, SearchError, build_index
from waterdrop.search.query import COPY_SIMILARITY, duplicate_groups, find_candidates


def seed_images(args, size: int) -> tuple[list[str], list[np.ndarray], list[tuple[str, str]]]:
    """(paths, decoded images, undecodable (path, why)) of the seeds."""
    if args.manifest:
        wanted = set(args.label)
        given = [line.item["image"] for line in parse_manifest(args.manifest)
                 if line.item is not None and wanted & set(line.item.get("labels", []))]
        if not given:
            raise cli.UsageError(f"{args.manifest}: no line with the label {' or '.join(sorted(wanted))}")
    else:
        given = args.seeds
    paths, images, bad = [], [], []
    for path, image in decoded_images(given, size):  # decoded as the scanner decodes the pool
        if isinstance(image, ImageDecodeError):
            bad.append((str(path), str(image)))
        else:
            paths.append(str(path))
            images.append(image)
    if not images:
        raise cli.UsageError(f"no seed could be decoded ({'; '.join(why for _, why in bad[:3])})")
    return paths, images, bad


def query(args) -> int:
    from waterdrop.curation.contact_sheet import contact_sheet
    from waterdrop.runtime import Predictor

    cli.check_onnx_file(args.model)
    if not args.seeds and not args.manifest:
        raise cli.UsageError("give seed images (files or folders) or --manifest M --label L")
    if args.manifest and not args.label:
        raise cli.UsageError("--manifest needs --label: the labels whose images are the seeds")
    index = PoolIndex(args.index)
    predictor = Predictor(args.model)
    if predictor.embedding is None:
        raise cli.UsageError(f"{args.model}: no embedding output; re-export it with tools/export.py")
    index.check_model(predictor.embedding, f"the model {args.model}")
    index.set_nprobe(args.nprobe)
    seed_paths, images, bad = seed_images(args, predictor.size)
    out = cli.output_path(args.out, Path(args.index) / "queries" / "query", args.overwrite)
    for _, why in bad:
        print(f"query: seed left out: {why}", file=sys.stderr)
    seeds = np.concatenate([predictor.embed_images(images[k:k + 32]) for k in range(0, len(images), 32)])
    found = find_candidates(index, seeds, args.top, args.rank_by, args.copy_similarity)
    ids = [c.id for c in found.ranked]
    paths = index.paths(ids)
    copies = {c.id: index.paths(c.copies) for c in found.ranked}
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"rank": rank, "path": path, "similarity": round(c.similarity, 5),
             "nearest_seed": seed_paths[c.nearest_seed], "copies": len(c.copies), "copy_paths": "|".join(copies[c.id])}
            for rank, (c, path) in enumerate(zip(found.ranked, paths), 1)]
    with open(out / "candidates.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["rank", "path", "similarity", "nearest_seed", "copies", "copy_paths"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), out / "candidates.parquet")
    with open(out / "to_label.jsonl", "w", encoding="utf-8") as stream:
        stream.writelines(json.dumps({"image": os.path.relpath(path, out)}) + "\n" for path in paths)
    if rows:
        shown = rows[:64]
        contact_sheet([r["path"] for r in shown], [f"#{r['rank']} sim {r['similarity']:.3f}\n+{r['copies']} copies"
                                                   for r in shown], out / "contact_sheet.png")
    summary = {"index": str(args.index), "index_kind": index.plan.kind, "pool_vectors": index.count,
               "seeds": seed_paths, "seeds_left_out": [{"path": p, "why": why} for p, why in bad],
               "rank_by": args.rank_by, "copy_similarity": args.copy_similarity, "searched": found.searched,
               "candidates": len(rows), "folded_copies": sum(r["copies"] for r in rows),
               "seed_copies_in_pool": {seed_paths[s]: index.paths(ids) for s, ids in found.seed_copies.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(rows)} candidates from {len(seed_paths)} seeds ({summary['folded_copies']} copies folded, "
          f"{sum(len(v) for v in found.seed_copies.values())} copies of seeds left out) in {out}", file=sys.stderr)
    return cli.EXIT_PARTIAL if bad else cli.EXIT_OK


def dedupe(args) -> int:
    from waterdrop.curation.cleaning import hamming, phash
    from waterdrop.imageio import read_image

    index = PoolIndex(args.index)
    out = cli.output_path(args.out, Path(args.index) / "dedupe" / "dedupe", args.overwrite)
    groups = duplicate_groups(index, args.similarity, nprobe=args.nprobe, progress=None if args.quiet else print)
    out.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    with open(out / "duplicates.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, ["group", "path", "keep", "phash_distance"])
        writer.writeheader()
        for number, group in enumerate(groups, 1):
            paths = index.paths(group)
            hashes = []
            for path in paths if not args.no_phash else []:
                try:
                    hashes.append(phash(read_image(path)))
                except ImageDecodeError:
                    hashes.append(None)
                    unreadable += 1
            for k, path in enumerate(paths):
                distance = ""
                if hashes and hashes[k] is not None and hashes[0] is not None:
                    distance = int(hamming(np.uint64(hashes[k]), np.uint64(hashes[0])))
                writer.writerow({"group": number, "path": path, "keep": k == 0, "phash_distance": distance})
    summary = {"index": str(args.index), "pool_vectors": index.count, "similarity": args.similarity,
               "groups": len(groups), "images_in_groups": sum(map(len, groups)),
               "removable": sum(len(g) - 1 for g in groups), "largest_group": max(map(len, groups), default=0),
               "unreadable_for_phash": unreadable}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['groups']} groups of near duplicates, {summary['removable']} images removable, in {out}",
          file=sys.stderr)
    return cli.EXIT_OK


def main() -> int:
    parser = cli.parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build or grow an index from scan folders")
    build.add_argument("scans", nargs="+", help="scan folders written by tools/scan.py --embeddings")
    build.add_argument("--index", required=True, help="the index folder")
    build.add_argument("--memory-gib", type=float, default=4.0, help="memory the index may take")
    build.add_argument("--expected-vectors", type=int, default=0,
                       help="the pool's size to come, when later scans will grow the index (first build only)")
    ask = commands.add_parser("query", help="find pool images like the seeds")
    ask.add_argument("seeds", nargs="*", help="seed images or folders")
    ask.add_argument("--index", required=True)
    ask.add_argument("--model", required=True, help="the .onnx file whose embedding built the index")
    ask.add_argument("--manifest", help="a JSONL manifest whose --label rows are the seeds")
    ask.add_argument("--label", action="append", help="a label of the manifest's seed rows (repeatable)")
    ask.add_argument("--top", type=int, default=200, help="candidates to list")
    ask.add_argument("--rank-by", choices=["mean", "max"], default="mean",
                     help="similarity to the seeds' mean, or to the nearest seed")
    ask.add_argument("--copy-similarity", type=float, default=COPY_SIMILARITY,
                     help="cosine at or above which two images are copies of one photograph")
    ask.add_argument("--nprobe", type=int, help="inverted lists searched (compressed index; default: the index's)")
    ask.add_argument("--out", help="output folder")
    twins = commands.add_parser("dedupe", help="group the pool's near duplicates")
    twins.add_argument("--index", required=True)
    twins.add_argument("--similarity", type=float, default=COPY_SIMILARITY, help="cosine of a near duplicate")
    twins.add_argument("--no-phash", action="store_true", help="leave out the pHash distance (no image decoded)")
    twins.add_argument("--nprobe", type=int, default=4, help="inverted lists searched per vector (compressed index)")
    twins.add_argument("--out", help="output folder")
    for sub in (ask, twins):
        cli.add_overwrite(sub)
        sub.add_argument("--quiet", action="store_true", help="no progress lines")
    build.add_argument("--quiet", action="store_true", help="no progress lines")
    args = cli.start(parser.parse_args())
    try:
        if args.command == "build":
            cli.check_exists(args.scans, "scan folder")
            record = build_index(args.scans, args.index, args.memory_gib * GiB, args.expected_vectors,
                                 progress=(lambda *_: None) if args.quiet else print)
            done = record["this_build"]
            print(f"{done['vectors_added']:,} vectors from {done['shards_added']} new shards added in "
                  f"{done['seconds']:.1f} s; {record['count']:,} vectors in the {record['plan']['kind']} index "
                  f"{args.index}", file=sys.stderr)
            return cli.EXIT_OK
        if not 0 < getattr(args, "copy_similarity", getattr(args, "similarity", 0.5)) <= 1:
            raise cli.UsageError("a similarity threshold is a cosine in (0, 1]")
        return query(args) if args.command == "query" else dedupe(args)
    except (SearchError, cli.UsageError, ValueError) as err:
        print(f"search_pool: {err}", file=sys.stderr)
        return cli.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
