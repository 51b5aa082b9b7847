"""`specdecpp generate`: one completion from the command line."""

from __future__ import annotations

import argparse
import json
import sys

from engine.params import SamplingParams
from specdecpp.model_args import add_model_args, add_spec_args, engine_config_from_args, spec_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="print one completion", description=__doc__)
    add_model_args(p)
    add_spec_args(p)
    s = p.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user message (chat template)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"text", "token_ids", "stats"}')
    p.add_argument("prompt", help="the prompt text ('-' reads stdin)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from engine.factory import build_engine  # heavy imports only when the command runs

    sampling = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop),
    )
    explicit_spec = args.policy is not None
    spec = spec_from_args(args)
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = build_engine(engine_config_from_args(args, spec))
    prompt = [{"role": "user", "content": prompt_text}] if args.chat else prompt_text
    completion = engine.generate(prompt, sampling, spec if explicit_spec else None)
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids, "stats": completion.stats}))
    else:
        print(completion.text)
        s = completion.stats
        print(
            f"[{s['policy']}] {s['generated_tokens']} tokens in {s['total_seconds']:.2f}s "
            f"({s['generated_tokens'] / max(s['total_seconds'], 1e-9):.2f} tok/s), "
            f"acceptance {s['acceptance_rate']:.2f}, discard {s['discard_rate']:.2f}, "
            f"verification {s['verification_rate']:.2f}, finish {completion.finish_reason}",
            file=sys.stderr,
        )
    return 0
