"""`clipmoe` command line: thin wrappers over the Python API. Errors print one line and exit 2; warnings
print one line each."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import warnings
from pathlib import Path

from .errors import ClipmoeError, make_folder
from .progress import log_file_defaults


def _quickstart(args) -> None:
    from .quickstart import format_table, quickstart

    summary = quickstart(args.out, overrides=args.set, seed=args.seed)
    print(format_table(summary["results"]))
    if summary["validation"]:
        print(_held_out(summary["validation"]))
    print(f"\nfinished in {summary['seconds']:.0f} s; data: {summary['data']}")
    for name, path in summary["files"].items():
        print(f"  {name:<17} {path}")


def _held_out(v: dict) -> str:
    """One line of a validation run's numbers."""
    if "error" in v:
        return f"held out (data.eval): could not be read at step {v['step']}: {v['error']}"
    recall = {what: "/".join(f"{v[f'{what}_retrieval_recall@{k}']:.1%}" for k in (1, 5, 10))
              for what in ("image", "text")}
    return (f"held out (data.eval, {v['num_samples']} pairs): loss {v['loss']:.4g}, recall@1/5/10 "
            f"image {recall['image']}, text {recall['text']}")


def _train(args) -> None:
    import torch.distributed as dist

    from .config import load_run_config
    from .train import train

    overrides = args.set + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_run_config(args.config, overrides)
    if args.deepspeed_config:  # as DeepSpeed's own scripts take it: a JSON file
        cfg.train = dataclasses.replace(cfg.train, deepspeed=_read_json(args.deepspeed_config, "--deepspeed-config"))
    result = train(cfg)
    if dist.is_initialized() and dist.get_rank() != 0:  # under a launcher rank 0 reports, as its progress bar did
        return
    last = result.history[-1]
    scalars = {k: v for k, v in last.items() if k != "step" and isinstance(v, (int, float))}
    print(f"step {last['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    speed = last.get("speed") or {}
    if speed.get("samples_per_s"):
        print(f"  {speed['samples_per_s']:.0f} samples/s (all ranks) over the last logged steps, "
              f"{speed['data_wait']:.0%} of the time waiting for data")
    for layer in last.get("moe", []):  # the moe_report of the last logged step
        print(f"  {layer['tower']}.{layer['block']:<3} tokens per expert {layer['tokens_per_expert']}, "
              f"dropped {layer['dropped_fraction']:.1%}")
    print(f"data: {result.data_stats}")
    if result.validation:
        print(_held_out(result.validation[-1]))
    for name, path in result.files.items():
        print(f"  {name:<17} {path}")


def _read_json(path: str, flag: str) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except OSError as e:
        raise ClipmoeError(f"{flag} {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ClipmoeError(f"{flag} {path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ClipmoeError(f"{flag} {path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _upcycle(args) -> None:
    from .checkpoint import save
    from .factory import create_model
    from .upcycle import upcycle

    paths = [p for p in (args.input, args.output) if p is not None]  # INPUT OUTPUT, either given as an option
    source = args.model_opt or (paths.pop(0) if paths else None)
    target = args.out_opt or (paths.pop(0) if paths else None)
    if source is None or target is None or paths:
        raise ClipmoeError("give the dense checkpoint and the file to write: clipmoe upcycle INPUT OUTPUT "
                           "(or --model INPUT --out OUTPUT)")
    towers = tuple(t.strip() for t in args.towers.split(","))
    blocks = None
    if args.blocks is not None:
        try:
            blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
        except ValueError:
            raise ClipmoeError(f"--blocks must be comma-separated block indices, got {args.blocks!r}") from None
    per_block = None
    if args.per_block is not None:  # a YAML (or JSON) mapping, as the config file's moe.per_block
        import yaml

        try:
            per_block = yaml.safe_load(args.per_block)
        except yaml.YAMLError:
            pass  # said below, as any other value that is no mapping
        if not isinstance(per_block, dict):
            raise ClipmoeError(f"--per-block must be a mapping of block indices to settings, e.g. "
                               f"'{{11: {{top_k: 1}}}}', got {args.per_block!r}")
    if args.pretrained:  # --model ARCH --pretrained TAG_OR_FILE, as the other commands load a model
        if args.arch:
            raise ClipmoeError("--pretrained names the weights of the architecture given as INPUT; drop --arch")
        source = create_model(source, pretrained=args.pretrained)
    every = 2 if args.every is None else args.every  # None in the parser: see --every there
    model = upcycle(source, num_experts=args.experts, top_k=args.top_k, every=every, towers=towers,
                    last=args.last, blocks=blocks, per_block=per_block, router=args.router,
                    capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.eval_capacity_factor, batch_priority=args.batch_priority,
                    eval_router=args.eval_router, min_capacity=args.min_capacity, jitter=args.jitter,
                    shared_expert=args.shared_expert, noise_std=args.noise_std, reinit_fraction=args.reinit_fraction,
                    arch=args.arch, seed=args.seed)
    print(f"wrote {save(model, target)}")


def _model(args):
    """--model: a clipmoe model file (or training checkpoint), or an architecture with --pretrained weights."""
    from .encode import resolve_model
    from .factory import create_model

    return create_model(args.model, pretrained=args.pretrained) if args.pretrained else resolve_model(args.model)


def _encode(args) -> None:
    import torch

    from .encode import encode_image, encode_text

    if bool(args.text) == bool(args.image):
        raise ClipmoeError("give --text or --image (one or more values)")
    if args.out:  # before the work, not after it
        make_folder(Path(args.out).parent, "--out")
    model = _model(args)
    features = (encode_text(args.text, model=model, progress=True) if args.text
                else encode_image(args.image, model=model, progress=True))
    if args.out:
        torch.save(features, args.out)  # a plain tensor; read back with torch.load(weights_only=True)
        print(f"wrote {tuple(features.shape)} embeddings to {args.out}")
    else:
        print(json.dumps([[round(v, 6) for v in row] for row in features.tolist()]))


def _analyze_routing(args) -> None:
    from .analysis import analyze_routing

    report = analyze_routing(_model(args), args.data, args.out, num_batches=args.batches,
                             batch_size=args.batch_size, top_words=args.top_words, top_patches=args.top_patches,
                             caption_key=args.caption_key, progress=True)
    for name, entry in report.items():
        load = " ".join(f"{x:.2f}" for x in entry["load"])
        print(f"{name:<9} load {load}")
        for e, top in enumerate(entry.get("top_words", [])):
            words = ", ".join(f"{w} {share:.0%}" for w, _, share in top[:8])
            print(f"    expert {e}: {words or 'took no words'}")
    print(f"wrote {Path(args.out) / 'routing.png'} and {Path(args.out) / 'routing.json'}")


def _validate(args) -> None:
    import loaders

    from .device import resolve_device
    from .validation import validate

    try:
        loaders.expand_shards(args.data)
    except ValueError as e:
        raise ClipmoeError(f"--data: {e}") from None
    if args.out:  # before the work, not after it
        make_folder(Path(args.out).parent, "--out")
    model = _model(args).to(resolve_device(args.device))
    metrics = validate(model, args.data, batch_size=args.batch_size, loss_kind=args.loss, precision=args.precision,
                       num_workers=args.workers, max_samples=args.max_samples, caption_key=args.caption_key,
                       progress=True)
    print(_held_out(metrics).replace("(data.eval, ", "("))
    if metrics["skipped"]:
        print(f"  skipped {sum(metrics['skipped'].values())} unreadable samples: {metrics['skipped']}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=1))
        print(f"wrote {args.out}")


def _shards(args) -> None:
    from loaders import shards

    try:
        if args.check:
            rows = shards.check_shards(args.check)
            print(f"{'shard':<12} {'expected':>8} {'found':>8} {'checksum':>8}  status")
            for r in rows:
                checksum = {True: "ok", False: "BAD", None: "-"}[r["checksum"]]  # "-": none recorded
                expected = "-" if r["expected"] is None else r["expected"]
                print(f"{r['name']:<12} {expected:>8} {r['found']:>8} {checksum:>8}  {r['status']}")
            bad = [r for r in rows if r["status"] != "ok"]
            if bad:
                raise ClipmoeError(f"{len(bad)} of {len(rows)} shards failed the check")
            return
        if bool(args.images) == bool(args.table) or not args.out:
            raise ClipmoeError("give --images DIR or --table FILE, and --out DIR (or --check DIR)")
        records = shards.records_from_folder(args.images) if args.images else shards.records_from_table(
            args.table, args.image_col, args.caption_col)
        if not records:
            raise ClipmoeError(f"no image-caption pairs found in {args.images or args.table}")
        manifest = shards.write_shards_from_records(records, args.out, samples_per_shard=args.per_shard,
                                                    resize=args.resize, processes=args.processes)
    except ValueError as e:
        raise ClipmoeError(str(e)) from None
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {args.out}")


def _zeroshot(args) -> None:
    from .zeroshot_eval import format_results, require_all, zeroshot_eval

    if args.list:
        import zeroshot
        print("\n".join(zeroshot.list_datasets()))
        return
    if not args.model or not args.datasets or not args.data_root:
        raise ClipmoeError("give --model, --datasets and --data-root (or --list)")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    results = zeroshot_eval(args.model, datasets, args.data_root, pretrained=args.pretrained, out=args.out,
                            split=args.split, batch_size=args.batch_size, num_workers=args.workers,
                            device=args.device, cache_dir=args.cache_dir, classnames_file=args.classnames,
                            templates_file=args.templates)
    print(format_results(results))
    if args.out:
        print(f"wrote {args.out}")
    require_all(results)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="clipmoe", description="CLIP pretraining with sparse Mixture-of-Experts")
    p.add_argument("--version", action="version", version=f"clipmoe {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="make shards, pretrain a small MoE CLIP, zero-shot evaluate")
    q.add_argument("--out", default="quickstart_out", help="output folder (default: quickstart_out)")
    q.add_argument("--seed", type=int, default=0, help="data seed")
    q.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.steps=100 data.batch_size=64")
    q.set_defaults(func=_quickstart)

    t = sub.add_parser("train", help="train from a YAML run config")
    t.add_argument("config", help="YAML file (see configs/)")
    t.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.steps=10 optim.lr=1e-4 (or --set once per override)")
    t.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue a run exactly from a training checkpoint (train.save_every): 'latest' (the "
                        "run's newest, or a fresh start), a run folder or a checkpoints/step_N folder")
    t.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", metavar="JSON",
                   help="train under DeepSpeed's engine with this DeepSpeed config (as train.deepspeed; ZeRO 0-2)")
    # the deepspeed launcher passes --local_rank; the rank is read from the environment (LOCAL_RANK) as torchrun sets it
    t.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    t.set_defaults(func=_train)

    u = sub.add_parser("upcycle", help="turn a dense checkpoint into an MoE one")
    u.add_argument("input", nargs="?", help="a clipmoe .safetensors file, or an open_clip / OpenAI checkpoint")
    u.add_argument("output", nargs="?", help="clipmoe .safetensors file to write")
    # the names the other commands give their model and output file
    u.add_argument("--model", dest="model_opt", metavar="INPUT", help="INPUT, as the other commands name it")
    u.add_argument("--out", dest="out_opt", metavar="OUTPUT", help="OUTPUT, as the other commands name it")
    u.add_argument("--pretrained", metavar="TAG_OR_FILE",
                   help="with an architecture for INPUT (--model ViT-B-32): its open_clip checkpoint (file or tag)")
    u.add_argument("--arch", help="architecture of an open_clip checkpoint (e.g. ViT-B-32-quickgelu); default: "
                                  "from the weights' shapes, with GELU")
    u.add_argument("--experts", "--num-experts", dest="experts", type=int, default=8)
    u.add_argument("--top-k", type=int, default=2)
    place = u.add_mutually_exclusive_group()  # one placement: a second one would be silently ignored
    # default None, not 2: argparse takes `--every 2` (the default's value) as not given, so it would pass with --last
    place.add_argument("--every", type=int, help="MoE in every n-th block (default: 2)")
    place.add_argument("--last", type=int, help="MoE in the last n blocks of each tower")
    place.add_argument("--blocks", help="MoE in these blocks, comma-separated (e.g. 1,3,5)")
    u.add_argument("--towers", default="image,text", help="image, text, or image,text (default)")
    u.add_argument("--router", choices=["topk", "expert_choice"], default="topk")
    u.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    u.add_argument("--eval-capacity-factor", type=float, default=None, help="default: dropless")
    u.add_argument("--min-capacity", type=int, default=4)
    u.add_argument("--jitter", type=float, default=0.0, help="router input jitter in training")
    u.add_argument("--batch-priority", action="store_true", help="Batch Prioritized Routing")
    u.add_argument("--eval-router", choices=["topk"], default=None,
                   help="expert choice only: evaluate with token choice (batch-independent embeddings)")
    u.add_argument("--shared-expert", action="store_true", help="an always-on dense expert beside the routed ones")
    u.add_argument("--per-block", metavar="YAML", help="settings that differ in some MoE blocks, as moe.per_block: "
                                                     "'{11: {top_k: 1, capacity_factor: null}}'")
    u.add_argument("--noise-std", type=float, default=0.0, help="relative noise on the expert copies")
    u.add_argument("--reinit-fraction", type=float, default=0.0, help="Drop-Upcycling: hidden units re-initialised")
    u.add_argument("--seed", type=int, default=0)
    u.set_defaults(func=_upcycle)

    e = sub.add_parser("encode", help="print or save L2-normalised embeddings")
    e.add_argument("--model", required=True, help="a clipmoe .safetensors file, or an architecture with --pretrained")
    e.add_argument("--pretrained", help="open_clip checkpoint (file or tag) for an architecture name")
    e.add_argument("--text", nargs="+", help="texts to embed")
    e.add_argument("--image", nargs="+", help="image files to embed")
    e.add_argument("--out", help="write a .pt tensor instead of printing JSON")
    e.set_defaults(func=_encode)

    s = sub.add_parser("shards", help="write WebDataset shards (img2dataset layout), or check a shard set")
    s.add_argument("--images", help="folder of images, each with a same-named .txt caption")
    s.add_argument("--table", help="captions table (.csv/.tsv/.jsonl/.parquet) with image and caption columns")
    s.add_argument("--image-col", "--url-col", dest="image_col", default="image",
                   help="the table's column of image paths (default: image)")
    s.add_argument("--caption-col", default="caption", help="the table's column of captions (default: caption)")
    s.add_argument("--out", help="output folder")
    s.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    s.add_argument("--resize", type=int, default=None, help="shrink images to at most this many pixels a side")
    s.add_argument("--processes", type=int, default=1)
    s.add_argument("--check", metavar="DIR", help="verify DIR against its manifest.json (or img2dataset's "
                   "_stats.json counts) and print a table")
    s.set_defaults(func=_shards)

    a = sub.add_parser("analyze-routing", help="expert load per layer, and which words / patches each expert takes")
    a.add_argument("--model", required=True, help="a clipmoe .safetensors file, or an architecture with --pretrained")
    a.add_argument("--pretrained", help="open_clip checkpoint (file or tag) for an architecture name")
    a.add_argument("--data", required=True, help="shards, e.g. 'DIR/{00000..00009}.tar'")
    a.add_argument("--out", default="routing", help="output folder (default: routing)")
    a.add_argument("--batches", type=int, default=4, help="batches to route (default: 4)")
    a.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    a.add_argument("--top-words", type=int, default=10, help="words listed per text expert (default: 10)")
    a.add_argument("--top-patches", type=int, default=8, help="patches shown per image expert (default: 8)")
    a.add_argument("--caption-key", default="txt", help="the caption: txt (default) or a field of key.json")
    a.set_defaults(func=_analyze_routing)

    v = sub.add_parser("validate", help="held-out loss and image<->text recall@k on image-text shards")
    v.add_argument("--model", required=True, help="a clipmoe .safetensors file, or an architecture with --pretrained")
    v.add_argument("--pretrained", help="open_clip checkpoint (file or tag) for an architecture name")
    v.add_argument("--data", required=True, help="shards, e.g. 'DIR/{00000..00009}.tar'")
    v.add_argument("--batch-size", type=int, default=256,
                   help="pairs per batch of the loss (its negatives; default: 256); recall is over all pairs")
    v.add_argument("--loss", choices=["softmax", "sigmoid"], default="softmax", help="the training loss's kind")
    v.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    v.add_argument("--max-samples", type=int, help="stop after this many pairs (whole batches)")
    v.add_argument("--caption-key", default="txt", help="the caption: txt (default) or a field of key.json")
    v.add_argument("--workers", type=int, default=0, help="data loader workers")
    v.add_argument("--device", help="default: cuda if available, else cpu")
    v.add_argument("--out", help="write the metrics JSON here")
    v.set_defaults(func=_validate)

    z = sub.add_parser("zeroshot", help="zero-shot classification / retrieval on local benchmark copies")
    z.add_argument("--model", help="a clipmoe .safetensors file, or an architecture with --pretrained")
    z.add_argument("--pretrained", help="open_clip checkpoint (file or tag) for an architecture name")
    z.add_argument("--datasets", help="comma-separated names (see --list), or 'folder' for a class-per-folder tree")
    z.add_argument("--dataset", dest="datasets", help="alias of --datasets")
    z.add_argument("--data-root", help="folder holding the local dataset copies")
    z.add_argument("--out", help="write results JSON here")
    z.add_argument("--split", default="test")
    z.add_argument("--batch-size", type=int, default=64)
    z.add_argument("--workers", type=int, default=0, help="data loader workers")
    z.add_argument("--device", help="default: cuda if available, else cpu")
    z.add_argument("--cache-dir", help="cache zero-shot classifiers here (keyed by weights, names, templates)")
    z.add_argument("--classnames", help="class names file (one per line, or JSON list)")
    z.add_argument("--templates", help="templates file (one per line with {c}, JSON list, or JSON class -> prompts)")
    z.add_argument("--list", action="store_true", help="list the known dataset names")
    z.set_defaults(func=_zeroshot)
    return p


def cpu_runtime_defaults(environ=os.environ) -> dict[str, str]:
    """Environment settings the clipmoe command gives the OpenMP runtime, where the user has set none: libgomp's
    spin after each parallel op cut from its default ~3 ms to ~0.1 ms (GOMP_SPINCOUNT=10000, ~100,000 spins per
    ms by its own estimate). Why: a thread still spinning keeps the CPU experts' second lane (a Python thread,
    see experts._run_lanes) off its core, up to 5 ms per call measured; waiting passively (no spin) frees the
    core but then every small op pays for waking its threads (the router's ~50 small ops per step). On
    2 cores, bf16, 4,096 tokens, clipmoe / dense x k over 5 alternated processes: 1.13 (k = 1, cf 1.25),
    0.99 (k = 1, dropless), 1.06 (k = 2, cf 1.25) against 1.21, 1.11 and 1.12 with OMP_WAIT_POLICY=PASSIVE;
    fp32 and 16,384 tokens level or better (BENCHMARKS.md). GOMP_SPINCOUNT overrides OMP_WAIT_POLICY, so a
    user's wait policy leaves both unset. Read when torch loads OpenMP: set before any import of torch."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    return {"GOMP_SPINCOUNT": "10000"}


def main(argv: list[str] | None = None) -> int:
    for key, value in {**cpu_runtime_defaults(), **log_file_defaults(sys.stderr)}.items():
        os.environ.setdefault(key, value)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE without --set, as Hydra-style tools take them: say where they go
        hint = ""
        if hasattr(args, "set") and all("=" in a and not a.startswith("-") for a in extra):
            hint = f" (config overrides go after --set: --set {' '.join(extra)})"
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    from loaders import DataError  # here, not at the top: `clipmoe --help` needs no torch

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"clipmoe {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning  # restored on leaving the block
            args.func(args)
    except (ClipmoeError, DataError) as e:
        print(f"clipmoe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be written or read (a path under a file, no permission, disk full)
        if e.filename is None:
            raise
        print(f"clipmoe {args.command}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training's says what it kept: "interrupted after 40 of 500 steps; ..."
        print(f"clipmoe {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # as the shell reports a signal: 130 Ctrl-C, 143 SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
