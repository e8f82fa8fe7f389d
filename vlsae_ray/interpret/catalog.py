"""The concept catalog: one parquet file per label run, one row per (SAE checkpoint, latent).

Columns: `sae` (the checkpoint's URI) and `sae_sha256` (of its weights file, so a catalog row
names the exact checkpoint even after the URI is overwritten), `latent`, `name` (null where the
latent is unnamed: no concept of the vocabulary explains it), `runner_up`, `similarity` (the
naming method's score of the best concept: agreement, SoftWPMI or cosine), `confidence` (for
naming `activations` the calibrated probability that the name is right, else the softmax
probability of the name over the vocabulary), `heldout_auroc` (how well the name's zero-shot score
predicts where the latent fires on held-out images; 0.5 is no better than chance), `naming` (the
method), `firing_count` (rows on which the latent is positive), `top_source_ids` and
`top_activations` (its top-k rows, largest first, positive activations only), for a VL-SAE
`top_captions` and `top_caption_activations` (its top-k text rows), `histogram_edges` and
`histogram_counts` (the histogram of its positive activations over the image rows, in the label
job's fixed log-spaced bins, `top_examples.HISTOGRAM_EDGES`, trimmed to the span of non-empty bins:
counts[i] activations lie in [edges[i], edges[i+1]), the last bin closed; null for a latent that
never fired; the counts add up to `firing_count`), and `steerability` (written by the steer job: its
best flip rate times hold rate, null until measured). Naming columns are null when
the run did not name latents or the latent never fired. The file's metadata records the label
config. See `vlsae_ray.interpret.naming` for the methods.

Written through `vlsae_ray.storage` (local, file:// or s3://) and queryable with DuckDB, e.g.

    SELECT latent, name, confidence, top_source_ids[1] AS top_image
    FROM 'labels/catalog.parquet' WHERE confidence > 0.5 ORDER BY confidence DESC LIMIT 10
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from vlsae_ray import storage

CATALOG_FILE = "catalog.parquet"

SCHEMA = pa.schema(
    [
        ("sae", pa.string()),
        ("sae_sha256", pa.string()),
        ("latent", pa.int32()),
        ("name", pa.string()),
        ("runner_up", pa.string()),
        ("similarity", pa.float32()),
        ("confidence", pa.float32()),
        ("heldout_auroc", pa.float32()),
        ("naming", pa.string()),
        ("firing_count", pa.int64()),
        ("top_source_ids", pa.list_(pa.string())),
        ("top_activations", pa.list_(pa.float32())),
        ("top_captions", pa.list_(pa.string())),
        ("top_caption_activations", pa.list_(pa.float32())),
        ("histogram_edges", pa.list_(pa.float32())),
        ("histogram_counts", pa.list_(pa.int64())),
        ("steerability", pa.float32()),
    ]
)


def write_catalog(uri: str, columns: dict[str, list], config: dict, rows: int | None = None) -> None:
    """Write the catalog's columns (names as in SCHEMA) as one parquet object at `uri`; `rows`:
    the activation rows the label run read (the denominator of a latent's firing density)."""
    metadata = {"vlsae_label_config": json.dumps(config)}
    if rows is not None:
        metadata["vlsae_rows"] = str(rows)
    table = pa.table(columns, schema=SCHEMA.with_metadata(metadata))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def max_activations(catalog: pa.Table) -> dict[int, float]:
    """{latent: its largest activation seen (its top example's)}, for latents that fired: the unit
    of relative steering strengths (`vlsae_ray.steer.steered(..., max_activations=...)`)."""
    rows = catalog.select(["latent", "top_activations"]).to_pylist()
    return {row["latent"]: row["top_activations"][0] for row in rows if row["top_activations"]}


def catalog_rows(catalog: pa.Table) -> int | None:
    """The activation rows the label run read (None for a catalog written before this was recorded)."""
    rows = (catalog.schema.metadata or {}).get(b"vlsae_rows")
    return None if rows is None else int(rows)


def read_catalog(uri: str) -> pa.Table:
    """The catalog at `uri` as an Arrow table; DuckDB queries it by its Python name (`FROM table`)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
