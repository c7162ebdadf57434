"""Image latents from a webdataset, text conditioning from an EmbeddingStore, joined by ``__key__``.

The LAION-style layout: img2dataset writes tar shards of ``<key>.jpg`` / ``<key>.txt`` / ``<key>.json``;
a VAE pass turns each image into ``<key>.latent.pth`` shards (not shown: any encoder loop); clipcond
precomputes the captions straight from the img2dataset tars into a store whose ids are the keys:

    clipcond precompute --encoder sdxl --input 'laion/{00000..00099}.tar' --column txt \\
        --out embeddings/ --dtype float16 --device cuda
    python examples/webdataset_latents.py --latents 'latents/{00000..00099}.tar' --store embeddings/

The latent shards are split across nodes and DataLoader workers by webdataset (``split_by_node``,
``split_by_worker``); each worker opens the store on its own and looks every sample's conditioning
up by key (``store.by_id``), with caption dropout from the store's null. ``--tiny`` writes small
latent and caption tars, precomputes them with ``tiny-sdxl`` and checks every joined row against
encoding its caption directly. Needs ``pip install clipcond[webdataset]``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
from pathlib import Path

import torch

import clipcond

DROP_PROB = 0.1


def conditioning_by_key(store_path: str, drop_prob: float, seed: int):  # noqa: ANN201 (a webdataset stage)
    """A webdataset ``map`` stage: adds the store's sequence and pooled vector to each sample, by ``__key__``.

    The store opens lazily in each worker (opening reads the manifest and index: milliseconds).
    Dropout is decided per (seed, epoch 0, row) as ``store.collate`` decides it.
    """
    state: dict[str, object] = {}

    def add(sample: dict) -> dict:
        if "store" not in state:
            state["store"] = store = clipcond.EmbeddingStore(store_path)
            state["dropout"] = store.collate(drop_prob, seed=seed)
        store, dropout = state["store"], state["dropout"]
        item = store.by_id(sample["__key__"])
        dropped = bool(dropout.dropped([item["row"]])[0])
        null = store.null()
        sample["sequence"] = null.sequence[0] if dropped else item["sequence"].clone()  # [77, D]
        sample["pooled"] = null.pooled[0] if dropped else item["pooled"].clone()  # [P]
        sample["dropped"] = dropped
        return sample

    return add


def loader(latents: str, store: str, *, batch_size: int, workers: int, drop_prob: float, seed: int = 0):  # noqa: ANN201
    import webdataset as wds

    dataset = (wds.WebDataset(latents, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                              shardshuffle=False)
               .decode()  # .pth members through torch.load (webdataset's default handlers)
               .map(conditioning_by_key(store, drop_prob, seed))
               .to_tuple("__key__", "latent.pth", "sequence", "pooled", "dropped")
               .batched(batch_size, partial=True))
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def write_tiny(root: Path, n: int = 24, shards: int = 3) -> tuple[str, str, list[str], list[str]]:
    """img2dataset-style caption tars and matching latent tars, ``n`` samples in ``shards`` shards each."""
    keys = [f"{i:09d}" for i in range(n)]
    captions = [f"a photo of object {i % 17}, {['red', 'blue', 'green'][i % 3]}" for i in range(n)]
    for kind in ("laion", "latents"):
        (root / kind).mkdir()
        per = n // shards
        for s in range(shards):
            with tarfile.open(root / kind / f"{s:05d}.tar", "w") as tar:
                for i in range(s * per, (s + 1) * per):
                    if kind == "laion":
                        members = {"jpg": b"\xff\xd8 not decoded", "txt": captions[i].encode(),
                                   "json": json.dumps({"key": keys[i], "caption": captions[i]}).encode()}
                    else:
                        buf = io.BytesIO()
                        torch.save(torch.full((4, 8, 8), float(i)), buf)
                        members = {"latent.pth": buf.getvalue()}
                    for ext, data in members.items():
                        info = tarfile.TarInfo(f"{keys[i]}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    brace = f"{{00000..{shards - 1:05d}}}"
    return str(root / "laion" / "*.tar"), str(root / "latents" / f"{brace}.tar"), keys, captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", help="latent webdataset shards (brace-expanded)")
    parser.add_argument("--store", help="the EmbeddingStore precomputed from the same keys")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="offline: tiny tars, tiny-sdxl, and a check")
    args = parser.parse_args()
    if not args.tiny and not (args.latents and args.store):
        parser.error("--latents and --store are needed (or --tiny)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from clipcond.precompute.job import PrecomputeJob, precompute

            tars, args.latents, keys, captions = write_tiny(Path(tmp))
            tc = clipcond.TextConditioner.from_pretrained("tiny-sdxl")
            args.store = str(Path(tmp) / "store")
            manifest = precompute(tc, PrecomputeJob(input=tars, out=args.store, column="txt", progress=False))
            print(f"precomputed {manifest['rows']} captions from {len(manifest['input']['paths'])} tars")
        seen, dropped_rows = [], 0
        for key, latent, sequence, pooled, dropped in loader(args.latents, args.store, batch_size=args.batch_size,
                                                             workers=args.workers, drop_prob=DROP_PROB):
            seen += key
            dropped_rows += int(sum(dropped))
            if args.tiny:  # every row: its own latent and its own caption's conditioning (or the null)
                for j, k in enumerate(key):
                    i = keys.index(k)
                    assert torch.equal(latent[j], torch.full((4, 8, 8), float(i))), k
                    ref = tc.null(1) if dropped[j] else tc([captions[i]])
                    torch.testing.assert_close(sequence[j], ref.sequence[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(pooled[j], ref.pooled[0], atol=1e-5, rtol=1e-5)
        print(f"joined {len(seen)} samples ({len(set(seen))} distinct keys) by __key__ across {args.workers} "
              f"workers, {dropped_rows} dropped to the null")
        if args.tiny:
            assert sorted(seen) == keys, "every sample exactly once across workers"
            print("every sample's latent and conditioning equal its own (direct encoding)")


if __name__ == "__main__":
    main()
