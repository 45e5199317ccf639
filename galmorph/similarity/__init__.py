"""Similarity search over a scored catalog's embeddings (docs/similarity.md).

`index.py` builds, extends and opens an index folder (a usearch HNSW graph of the embeddings,
an id table in Parquet, a JSON manifest naming the model); `cli.py` is `galmorph index` and
`galmorph similar`. Torch-free and server-free: it imports galmorph.core only, and the server's
/similar routes (galmorph.service.routers.similar) open the same index read-only.
"""
