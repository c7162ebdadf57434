"""``clipcond`` command line: thin ``_cmd_<name>(args) -> int`` wrappers over the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from clipcond.encoders.names import get_spec
from clipcond.registry import ALIASES, REGISTRY

DTYPES = ("float32", "float16", "bfloat16")


def _cmd_list(args: argparse.Namespace) -> int:
    if args.json:  # a spec file a lab can edit and pass back as --encoder FILE
        print(json.dumps(get_spec(args.json).to_dict(), indent=2))
        return 0
    if args.open_clip:
        return _list_open_clip()
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    print(f"{'name':28} {'aliases':24} {'D':>5} {'P':>5}  null   default weights")
    for name, spec in REGISTRY.items():
        print(f"{name:28} {', '.join(aliases.get(name, [])):24} {spec.sequence_dim:5d} {spec.pooled_dim:5d}  "
              f"{spec.null:6} {spec.hub_repo or '(seeded random, tests/demos)'}")
    return 0


def _list_open_clip() -> int:
    from clipcond.encoders.openclip import list_open_clip

    models = list_open_clip()
    print(f"{'open_clip model':36} {'ok':3}  pretrained tags, or why its text tower does not qualify")
    for m in models:
        print(f"{m.name:36} {'no' if m.problems else 'yes':3}  "
              f"{'; '.join(m.problems) if m.problems else ', '.join(m.tags) or '(no pretrained tags)'}")
    print(f"{sum(not m.problems for m in models)} of {len(models)} qualify: "
          f"TextConditioner.from_pretrained('open_clip:MODEL', pretrained=TAG)")
    return 0


def _load(args: argparse.Namespace):  # noqa: ANN202 (imports torch lazily)
    import torch

    from clipcond.encoders.conditioner import TextConditioner

    if args.open_clip_config:
        import open_clip

        open_clip.add_model_config(args.open_clip_config)
    tokenizer = {"tokenizer": args.tokenizer} if args.tokenizer else {}  # a T5 recipe's, where weights have none
    tc = TextConditioner.from_pretrained(args.encoder, weights=args.weights, pretrained=args.pretrained,
                                         device=args.device, dtype=getattr(torch, args.dtype), **tokenizer)
    return tc.compile(mode=args.compile) if getattr(args, "compile", None) else tc


def _cmd_encode(args: argparse.Namespace) -> int:
    tc = _load(args)
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin]
    c = tc(prompts)
    spec = tc.spec
    towers = [f"{t.name} (width {t.width}, layer {t.hidden_layer}, final LN {t.final_norm}, pad {t.pad_id})"
              for t in spec.towers]
    if spec.t5 is not None:
        towers.append(f"T5 (d_model {spec.t5.d_model}, {spec.t5.layers} layers, max length {spec.t5_max_length}, "
                      f"mask {spec.t5_mask}, padding {spec.padding})")
    print(f"encoder {spec.name}: {', '.join(towers)}")
    print(f"sequence {tuple(c.sequence.shape)} {c.sequence.dtype} on {c.sequence.device}; "
          f"pooled {tuple(c.pooled.shape)} from tower(s) "
          f"{', '.join(f'{i} ({spec.towers[i].pooled})' for i in spec.pooled_towers)}")
    tokens = tc.tokenize(prompts)  # each tokenizer's (a T5 recipe's T5 last)
    for i, prompt in enumerate(prompts):
        counts = list(dict.fromkeys(str(int(t.eos[i]) + 1) for t in tokens))  # one number where they agree
        print(f"[{i}] {prompt!r}: {' / '.join(counts)} tokens, |sequence| {c.sequence[i].float().norm():.4f}, "
              f"|pooled| {c.pooled[i].float().norm():.4f}")
    null = tc.null(1)
    print(f"null ({spec.null}): |sequence| {null.sequence.float().norm():.4f}, "
          f"|pooled| {null.pooled.float().norm():.4f}")
    source = args.weights or spec.hub_repo or "seeded random (tiny spec)"
    print(f"weights: {source}; fingerprint {tc.fingerprint[:16]}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from clipcond.encoders.hub import download
    from clipcond.encoders.weights import hf_weight_files

    spec = get_spec(args.encoder)
    repo = args.repo or spec.hub_repo
    if repo is None:
        print(f"{spec.name} has no published weights", file=sys.stderr)
        return 2
    root = download(spec, repo, revision=args.revision)
    if root.is_file():  # an open_clip checkpoint
        files = [root]
    else:
        folders = [root / t.hub_subfolder for t in spec.towers if (root / t.hub_subfolder).is_dir()] or [root]
        files = [f for folder in folders for f in hf_weight_files(folder)]
    for file in files:
        relative = file.relative_to(root.parent if root.is_file() else root)
        print(f"{repo}/{relative}: {file.stat().st_size / 1e6:.1f} MB ({file})")
    return 0


def _cmd_precompute(args: argparse.Namespace) -> int:
    from clipcond.precompute.job import PrecomputeJob, Ranks, precompute, rank_device
    from clipcond.store.manifest import Manifest

    job = PrecomputeJob(input=args.input, out=args.out, column=args.column or ["caption"], id_column=args.id_column,
                        limit=args.limit, batch_size=args.batch_size, shard_size=args.shard_size, part=args.part,
                        verify=args.verify)
    args.device = rank_device(args.device)
    manifest = precompute(_load(args), job)
    if Ranks.from_env().rank == 0:
        run = manifest["run"]
        print(f"{run['encoded']} encoded, {run['reused']} reused")
        if run.get("waiting"):
            print(f"part {job.part[0]}/{job.part[1]} done; the last part to finish publishes the store")
        else:
            print("\n".join(Manifest.from_json(manifest).describe(job.out)))
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from clipcond.store.gc import collect

    result = collect(args.out)
    print(f"{args.out}: {result.removed} unreferenced embeddings removed ({result.rewritten} shards rewritten, "
          f"{result.deleted} deleted), {result.kept} kept")
    return 0


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must be I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part I/N needs 0 <= I < N, got {text!r}")
    return i, n


def _cmd_inspect(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    from pathlib import Path

    from clipcond.encoders.weights import FORMATS, StateReader, detect_format

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (a checkpoint file or an embedding store)")
    if path.is_dir():  # an embedding store (clipcond precompute --out DIR)
        from clipcond.store.manifest import inspect_store

        lines, problems = inspect_store(path)
        print("\n".join(lines))
        print("\n".join(f"  PROBLEM {p}" for p in problems) if problems else "  verified every file's size and sha256")
        return 1 if problems else 0
    with ExitStack() as stack:
        reader = StateReader([path], stack)
        keys = reader.keys()
        fmt = detect_format(keys, str(path))
        description, _, components = FORMATS[fmt]
        print(f"{path}: {description}, {len(keys)} tensors")
        for comp in components:
            n = sum(k.startswith(comp.prefix) for k in keys)
            print(f"  text tower {comp.family!r} under {comp.prefix or '(root)'!r}: {n} tensors "
                  f"({comp.layout} layout)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipcond", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="registered encoders and aliases")
    ls.add_argument("--open-clip", action="store_true", help="which open_clip models qualify as open_clip:MODEL")
    ls.add_argument("--json", metavar="NAME", help="write NAME's spec as JSON (edit it, pass it as --encoder FILE)")

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--encoder", required=True,
                       help="registered name or alias (clipcond list), open_clip:MODEL, or a spec .json file")
        p.add_argument("--weights", help="local folder/file or hub repo id (default: the name's hub repo)")
        p.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag of an open_clip:MODEL encoder")
        p.add_argument("--open-clip-config", metavar="PATH",
                       help="an open_clip model config JSON (or a folder of them) for --encoder open_clip:NAME")
        p.add_argument("--tokenizer", metavar="PATH", help="a T5 recipe's tokenizer folder where --weights has none "
                       "(e.g. FLUX.1-dev/tokenizer_2)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=DTYPES)

    enc = sub.add_parser("encode", help="encode prompts (arguments, or one per stdin line) and print a summary")
    model_args(enc)
    enc.add_argument("prompts", nargs="*")
    dl = sub.add_parser("download", help="fetch only the text-encoder files of a name's hub repo into the HF cache")
    dl.add_argument("encoder")
    dl.add_argument("--repo", help="another diffusers pipeline repo with the same layout")
    dl.add_argument("--revision")
    pre = sub.add_parser("precompute", help="encode a caption dataset into a sharded, resumable embedding store "
                         "(torchrun --nproc-per-node N -m clipcond precompute ... splits it by rank)")
    model_args(pre)
    pre.add_argument("--input", required=True, action="append",
                     help=".txt (a caption per line), .jsonl, .csv, .parquet, webdataset .tar, or a Hugging Face "
                     "dataset folder (save_to_disk); repeat it or use a glob ('data/*.parquet'): sorted path order")
    pre.add_argument("--column", action="append",
                     help="caption column (default: caption; tars: txt, or json:FIELD); repeat it for caption "
                     "variants, or name a list-valued column")
    pre.add_argument("--id-column", help="unique id column, for EmbeddingStore.by_id (tars: their __key__)")
    pre.add_argument("--out", required=True, help="store folder; rerun to resume it, or with a grown or changed "
                     "input to encode only the captions it lacks")
    pre.add_argument("--verify", action="store_true", help="check every stored shard's sha256 first and encode "
                     "the damaged ones again")
    pre.add_argument("--part", type=_part, metavar="I/N", help="encode part I of N (0-based) into the same --out, "
                     "e.g. a Slurm array task or a Kubernetes indexed Job; the last part to finish publishes")
    pre.add_argument("--batch-size", type=int, default=128)
    pre.add_argument("--limit", type=int, help="encode only the first LIMIT rows")
    pre.add_argument("--shard-size", type=int, help="unique embeddings per shard (default: about 256 MiB a shard)")
    pre.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                     choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                     help="torch.compile the towers (MODE: default, or reduce-overhead for CUDA graphs)")
    gc = sub.add_parser("gc", help="remove embeddings no row of a store refers to any more (after inputs shrank)")
    gc.add_argument("out")
    ins = sub.add_parser("inspect", help="what a checkpoint file holds, or describe and verify an embedding store")
    ins.add_argument("path")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return globals()[f"_cmd_{args.command}"](args)
    except (ValueError, KeyError, TypeError, OSError) as err:  # WeightsError and SpecError are ValueErrors
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() adds quotes
        print(f"clipcond {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
