"""The embedding store: what ``clipcond precompute`` writes and ``EmbeddingStore`` reads.

``format`` (the one owner of the manifest, index, shards and which files belong to a store), ``checksums``
(row checks, ``_rows.c``), ``locks``, ``reader`` (``EmbeddingStore``), ``gc``. Imports only the leaves.
"""
