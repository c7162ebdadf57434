"""The embedding store: what ``clipcond precompute`` writes and ``EmbeddingStore`` reads.

``format`` (the one owner of the manifest, index, shards, row checksums and locks), ``_rows.c`` (the compiled
copy-and-checksum), ``reader`` (``EmbeddingStore``, ``JoinedDataset``), ``gc``. Imports only the leaves.
"""
