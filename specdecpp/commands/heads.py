"""`specdecpp heads gen-data | train | eval`: build the acceptance head for a draft model."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def default_data_root() -> Path:
    home = os.environ.get("SPECDECPP_HOME") or Path.home() / ".cache" / "specdecpp"
    return Path(home) / "heads-data"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="acceptance head: generate data, train, evaluate", description=__doc__)
    hs = p.add_subparsers(dest="heads_command", required=True, metavar="STEP")

    g = hs.add_parser("gen-data", help="sample target responses and label draft tokens (resumable shards)")
    g.add_argument("--target", help="target model (default: the default pair's)")
    g.add_argument("--draft", help="draft model (default: the default pair's)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="models' dtype")
    g.add_argument("--device", default=None, help="device for both models (default: cuda if any, else cpu)")
    g.add_argument(
        "--source",
        default="sharegpt",
        help="'sharegpt', 'humaneval' (evaluation data only) or a JSONL file of prompts",
    )
    g.add_argument("--split", default="train", choices=["train", "heldout"], help="ShareGPT split")
    g.add_argument("--num-prompts", type=int, default=512)
    g.add_argument("--code-fraction", type=float, default=0.4, help="ShareGPT: share of code requests")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts (after the template)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--shard-prompts", type=int, default=64, help="prompts per shard")
    g.add_argument("--mixing-ratio", type=float, default=0.15, help="share of positions fed the target token")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help=f"output directory (e.g. {default_data_root()}/sharegpt-train)")
    g.set_defaults(func=run_gen_data)

    t = hs.add_parser("train", help="train a head on generated data")
    t.add_argument("--data", nargs="+", required=True, help="data directories from gen-data")
    t.add_argument("--out", required=True, help="head directory to write (model.safetensors + config.json)")
    t.add_argument("--depth", type=int, default=3, help="residual blocks")
    t.add_argument("--w-reject", type=float, default=6.0, help="weight of the reject class in the loss")
    t.add_argument("--lr", type=float, default=1e-3, help="learning rate of the hidden-state path")
    t.add_argument("--feature-lr", type=float, default=1e-2, help="learning rate of the feature weights")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--batch-size", type=int, default=128, help="tokens per step")
    t.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    t.add_argument("--warmup", type=float, default=0.05, help="share of steps with linear warmup")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of sequences held out for validation")
    t.add_argument("--patience", type=int, default=4, help="early stop after this many epochs without gain")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--features",
        nargs="+",
        default=["all"],
        help="draft statistics the head also sees: any of log_draft_prob draft_entropy log_draft_max, "
        "'all' (default) or 'none' (the paper's hidden-state-only head)",
    )
    t.set_defaults(func=run_train)

    e = hs.add_parser("eval", help="binary KL, AUC and calibration: head vs draft confidence")
    e.add_argument("--head", required=True, help="head directory")
    e.add_argument("--data", nargs="+", required=True, help="held-out data directories from gen-data")
    e.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-': stdout)")
    e.add_argument("--report", action="store_true", help="also write report.json and REPORT.md into the head dir")
    e.set_defaults(func=run_eval)


def _prompts(args: argparse.Namespace):
    from heads import prompts

    if args.source == "sharegpt":
        return prompts.sharegpt_prompts(args.num_prompts, args.split, args.code_fraction, seed=args.seed)
    if args.source == "humaneval":
        return prompts.humaneval_prompts(args.num_prompts)
    if Path(args.source).is_file():
        return prompts.jsonl_prompts(args.source, args.num_prompts)
    raise ValueError(f"--source: {args.source!r} is neither 'sharegpt', 'humaneval' nor a JSONL file")


def run_gen_data(args: argparse.Namespace) -> int:
    import torch

    from engine.config import EngineConfig
    from engine.cpu_linear import pack_linears
    from engine.factory import resolve_paths
    from engine.loader import eos_token_ids, load_model, load_tokenizer, model_identity, parse_dtype
    from heads.data import GenConfig, generate_dataset

    if args.target is None and args.draft is None:
        target_spec, draft_spec, _ = resolve_paths(EngineConfig(head="none"))
    elif args.target is None or args.draft is None:
        raise ValueError("give both --target and --draft, or neither (the default pair)")
    else:
        target_spec, draft_spec = args.target, args.draft
    prompts = _prompts(args)
    log.info("%d prompts from %s", len(prompts), args.source)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype)
    tokenizer = load_tokenizer(target_spec)
    target = load_model(target_spec, dtype, device=device)
    draft = load_model(draft_spec, dtype, device=device)
    for model in (target, draft):
        # CPU only: the same data up to summation order, generated faster (engine/cpu_linear.py)
        pack_linears(model, fp32_copies="auto")
    config = GenConfig(
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        shard_prompts=args.shard_prompts,
        mixing_ratio=args.mixing_ratio,
        seed=args.seed,
    )
    description = {
        "source": args.source,
        "split": args.split if args.source == "sharegpt" else None,
        "draft_id": model_identity(draft_spec),
        "target_id": model_identity(target_spec),
        "dtype": args.dtype,
    }
    manifest = generate_dataset(
        target, draft, tokenizer, prompts, args.out, config, sorted(eos_token_ids(target, tokenizer)), description
    )
    print(f"{args.out}: {len(manifest['shards'])} shards, {manifest['tokens']} tokens, complete={manifest['complete']}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from heads.model import DRAFT_FEATURES
    from heads.train import TrainConfig, train_from_dirs

    features = tuple(args.features)
    if features == ("all",):
        features = DRAFT_FEATURES
    elif features == ("none",):
        features = ()
    elif not set(features) <= set(DRAFT_FEATURES):
        raise ValueError(f"--features: choose from {', '.join(DRAFT_FEATURES)}, 'all' or 'none'")
    config = TrainConfig(
        depth=args.depth,
        w_reject=args.w_reject,
        lr=args.lr,
        feature_lr=args.feature_lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        warmup=args.warmup,
        val_fraction=args.val_fraction,
        patience=args.patience,
        seed=args.seed,
        features=features,
    )
    head = train_from_dirs(args.data, args.out, config)
    record = head.config.training
    print(
        f"{args.out}: best epoch {record['best_epoch']}/{record['epochs_run']}, val loss {record['best_val_loss']:.4f} "
        f"({record['train_tokens']} train / {record['val_tokens']} val tokens)"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from heads.evaluate import evaluate, format_table
    from heads.model import load_head
    from heads.report import write_report

    head = load_head(args.head)
    results = [evaluate(head, d) for d in args.data]
    for result in results:
        print(format_table(result) + "\n")
    if args.json == "-":
        print(json.dumps(results, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.report:
        write_report(args.head, results)
        print(f"wrote {Path(args.head) / 'REPORT.md'} and report.json")
    return 0
