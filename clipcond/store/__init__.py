"""The embedding store: what ``clipcond precompute`` writes and ``EmbeddingStore`` reads.

``manifest`` (``manifest.json``: what a store is bound to, every file it holds), ``format`` (shards, the
index, which files are a store's), ``checksums`` (row checks; ``_rows.c``, the compiled copy-and-checksum),
``locks``, ``layout`` (how a row's sequence is held), ``shard_view`` (one shard's rows, mapped and checked),
``reader`` (``EmbeddingStore``), ``batch`` (batch memory), ``handover`` (batches handed from DataLoader workers
through shared memory they reuse), ``dropout`` (``CaptionDropout``), ``join`` (``JoinedDataset``,
``JoinedLoader``, ``LengthGroupedSampler``), ``gc``. Imports the leaves, and clipcond.encoders.recipes for
per-tower caption dropout.
"""
