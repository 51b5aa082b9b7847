"""`specdecpp heads gen-data | train | eval`: build the acceptance head for a draft model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.config import DTYPES, HEAD_QUANTIZATION_MODES, QUANTIZATION_MODES


def default_data_root() -> Path:
    home = os.environ.get("SPECDECPP_HOME") or Path.home() / ".cache" / "specdecpp"
    return Path(home) / "heads-data"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="acceptance head: generate data, train, evaluate", description=__doc__)
    hs = p.add_subparsers(dest="heads_command", required=True, metavar="STEP")

    g = hs.add_parser("gen-data", help="sample target responses and label draft tokens (resumable shards)")
    g.add_argument("--target", help="target model (default: the default pair's)")
    g.add_argument("--draft", help="draft model (default: the default pair's)")
    g.add_argument("--dtype", default="bf16", choices=DTYPES, help="models' dtype")
    g.add_argument("--device", default=None, help="device for both models (default: cuda if any, else cpu)")
    g.add_argument("--draft-quantization", default="none", choices=("auto", *QUANTIZATION_MODES),
                   help="weight-only quantization of the draft whose rounds are logged (default: %(default)s)")
    g.add_argument("--source", default="sharegpt",
                   help="'sharegpt', 'humaneval' or 'mixed' (both evaluation data only) or a JSONL file of prompts")
    g.add_argument("--split", default="train", choices=["train", "heldout"], help="ShareGPT split")
    g.add_argument("--num-prompts", type=int, default=512)
    g.add_argument("--code-fraction", type=float, default=0.4, help="ShareGPT: share of code requests")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--max-prompt-tokens", type=int, default=384, help="skip longer prompts (after the template)")
    g.add_argument("--k", type=int, default=8, help="candidates per round (constant k; every one is labelled)")
    g.add_argument("--batch-size", type=int, default=16, help="sequences the engine batches per round")
    g.add_argument("--shard-prompts", type=int, default=64, help="prompts per shard")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    g.add_argument("--sampling", nargs="+", type=_sampling, metavar="T:TOP_P",
                   help="(temperature, top-p) settings the prompts cycle through (default: 1:1 1:1 0:1 0.7:0.9)")
    g.add_argument("--stop-after-minutes", type=float,
                   help="start no new shard after this long (rerun the same command to resume)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help=f"output directory (e.g. {default_data_root()}/sharegpt-train)")
    g.set_defaults(func=run_gen_data)

    t = hs.add_parser("train", help="train a head on generated data")
    t.add_argument("--data", nargs="+", required=True, help="data directories from gen-data")
    t.add_argument("--out", required=True, help="head directory to write (model.safetensors + config.json)")
    t.add_argument("--timing", default="before", choices=["before", "after"],
                   help="judge a candidate before the draft's forward on it (default) or after it (the paper's)")
    t.add_argument("--depth", type=int, default=3, help="residual blocks")
    t.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout on the standardised hidden state while training (regularises its path)")
    t.add_argument("--w-reject", type=float, default=1.0, help="weight of the reject class in the loss")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--batch-size", type=int, default=256, help="candidates per step")
    t.add_argument("--epochs", type=int, default=20, help="maximum epochs")
    t.add_argument("--warmup", type=float, default=0.05, help="share of steps with linear warmup")
    t.add_argument("--val-fraction", type=float, default=0.1, help="share of sequences held out for validation")
    t.add_argument("--patience", type=int, default=3, help="early stop after this many epochs without gain")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train)

    r = hs.add_parser("predict", help="offline evaluator: every stop rule's expected speedup from logged rounds")
    r.add_argument("--data", nargs="+", required=True, help="data directories from gen-data (held out)")
    r.add_argument("--head", help="acceptance head directory (default: the shipped head)")
    r.add_argument("--post-head", help="a second head (e.g. one judging after the forward), rows specdec++-post")
    r.add_argument("--costs", help="cost model JSON (default: measure it now with the default pair)")
    r.add_argument("--save-costs", help="write the cost model used to this JSON file")
    r.add_argument("--head-quantization", choices=HEAD_QUANTIZATION_MODES, default="auto",
                   help="the head's kernels when the cost model is measured now, as the engine's option "
                        "(default: %(default)s); its estimates come from the head as trained either way")
    r.add_argument("--bounds", type=int, nargs=2, default=[1, 20], metavar=("MIN", "MAX"))
    r.add_argument("--temperature", type=float, help="only rounds sampled at this temperature")
    r.add_argument("--replay", choices=("text", "rounds"), default="text",
                   help="walk the logged text, each rule's rounds starting where its own end (default), or score "
                        "the logged rounds one by one")
    r.add_argument("--headroom", action="store_true",
                   help="also score heads between the head and a perfect one: what a better head would buy here")
    r.add_argument("--output", required=True, help="JSON file to write")
    r.set_defaults(func=run_predict)

    e = hs.add_parser("eval", help="binary KL, AUC and calibration: head vs draft confidence")
    e.add_argument("--head", required=True, help="head directory")
    e.add_argument("--data", nargs="+", required=True, help="held-out data directories from gen-data")
    e.add_argument("--json", metavar="PATH", help="write the figures as JSON ('-': stdout)")
    e.add_argument("--report", action="store_true", help="also write report.json and REPORT.md into the head dir")
    e.set_defaults(func=run_eval)


def _sampling(text: str) -> tuple[float, float]:
    """One --sampling value, TEMPERATURE:TOP_P (top-p 1 if left out)."""
    temperature, _, top_p = text.partition(":")
    try:
        return float(temperature), float(top_p or 1.0)
    except ValueError:
        raise SystemExit(f"--sampling expects TEMPERATURE:TOP_P, got {text!r}") from None


# Each step lives next to what it drives and imports torch; the parser above needs neither.
def run_gen_data(args: argparse.Namespace) -> int:
    from heads.data import GenConfig, gen_data

    config = GenConfig(max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens, k=args.k,
                       shard_prompts=args.shard_prompts, seed=args.seed,
                       **({"sampling": tuple(args.sampling)} if args.sampling else {}))
    gen_data(args.out, config, source=args.source, split=args.split, num_prompts=args.num_prompts,
             code_fraction=args.code_fraction, target=args.target, draft=args.draft, dtype=args.dtype,
             device=args.device, batch_size=args.batch_size, threads=args.threads,
             draft_quantization=args.draft_quantization,
             stop_after_minutes=args.stop_after_minutes)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from heads.train import TrainConfig, train_from_dirs

    config = TrainConfig(timing=args.timing, depth=args.depth, hidden_dropout=args.hidden_dropout,
                         w_reject=args.w_reject, lr=args.lr, weight_decay=args.weight_decay,
                         batch_size=args.batch_size, max_epochs=args.epochs, warmup=args.warmup,
                         val_fraction=args.val_fraction, patience=args.patience, seed=args.seed)
    train_from_dirs(args.data, args.out, config)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from specdecpp.bench.stop_rules import predict_from_data

    predict_from_data(args.data, args.output, bounds=tuple(args.bounds), head=args.head, post_head=args.post_head,
                      costs=args.costs, save_costs=args.save_costs, temperature=args.temperature,
                      replay=args.replay, head_quantization=args.head_quantization, headroom=args.headroom)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from heads.evaluate import evaluate_dirs

    evaluate_dirs(args.head, args.data, json_path=args.json, report=args.report)
    return 0
