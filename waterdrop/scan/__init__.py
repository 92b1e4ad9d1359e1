"""Pool scanning: score millions of images with an exported model into Parquet shards.

    from waterdrop.scan import scan_local
    record = scan_local("model.onnx", "pool/", "scans/today")   # or a .jsonl manifest, a path list
    print(record["this_run"])                                    # seen, scored, errors, images/s

``scan_ray`` runs the same scan on Ray Data. Modules:
``sources`` (streaming path readers), ``incremental`` (what earlier scans spare), ``rows``
(decoding and the row builder: the columns), ``store`` (shards, resumption, scan.json),
``local`` and ``ray_engine`` (the engines). Nothing here imports torch; Ray is imported only by the Ray engine.
"""

try:
    import pyarrow  # noqa: F401
except ImportError as err:  # the runtime install does not have it
    raise ImportError(f"pool scanning needs pyarrow ({err}); install it with: pip install waterdrop[scan]") from err

from waterdrop.scan.local import scan_local
from waterdrop.scan.ray_engine import scan_ray  # imports Ray itself only when called
from waterdrop.scan.rows import RowBuilder, decode_for_model
from waterdrop.scan.sources import Entry, source_entries
from waterdrop.scan.store import ScanError, ShardStore

__all__ = [
    "Entry",
    "RowBuilder",
    "ScanError",
    "ShardStore",
    "decode_for_model",
    "scan_local",
    "scan_ray",
    "source_entries",
]
