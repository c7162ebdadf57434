"""``clipcond precompute``: a caption dataset encoded once into a store, in stages that hand their result down.

``inputs`` (caption tables; ``tar``: webdataset tars) -> ``scan`` (unique captions, ids; ``scan_cache``: a rerun's
scan of unchanged files) -> ``plan`` (what is new, which slots, which shards) -> ``encode`` (the tokenize / encode /
write threads) -> publish; ``job`` runs them.
"""
