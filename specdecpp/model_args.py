"""Model, placement and speculation flags shared by generate, serve and bench."""

from __future__ import annotations

import argparse

from engine.config import CPU_FP32_GEMM_MODES, EngineConfig
from engine.params import POLICY_NAMES, SpecConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--target", help="target model: HF directory, .gguf file or hub id (default: the default pair)")
    g.add_argument("--draft", help="draft model (default: the default pair's draft; 'none' for no draft)")
    g.add_argument("--head", help="acceptance head directory (default: the shipped head for the draft)")
    g.add_argument("--extra-head", action="append", default=[], metavar="NAME=DIR",
                   help="another acceptance head, chosen per request with specdec.head=NAME (repeatable)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights dtype")
    g.add_argument("--draft-dtype", choices=["bf16", "fp16", "fp32"], help="draft dtype (default: --dtype)")
    g.add_argument("--draft-device", help="device for the draft and head (default: GPU 0 or cpu)")
    g.add_argument("--target-devices", type=_device_list, metavar="DEV[,DEV...]",
                   help="comma-separated devices for the target; several: sharded (e.g. cuda:1,cuda:2)")
    g.add_argument("--max-model-len", type=int, help="context limit (default: the target's)")
    b = parser.add_argument_group("batching")
    b.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together (default: 8)")
    b.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="prefill chunk: prompt tokens per forward for a new request (default: 512)")
    b.add_argument("--kv-cache-tokens", type=int, default=131072,
                   help="admission budget: sum of prompt + max_tokens over running requests (default: 131072)")
    b.add_argument("--no-batching", dest="batching", action="store_false",
                   help="give every running request its own forwards (round-robin) instead of one batch")
    b.add_argument("--speculative-disable-by-batch-size", dest="spec_disable_batch_size", type=int, metavar="N",
                   help="rounds with N or more sequences run the target alone (no draft): where verifying many "
                   "candidates for a large batch costs more than it saves (default: always speculate)")
    b.add_argument("--speculative-batch-candidates", dest="spec_batch_candidates", type=int, metavar="N",
                   help="candidates of one batched round, all sequences together: each of b sequences proposes "
                   "at most N // b (its policy may stop sooner), none once b > N. Verification gets "
                   "compute-bound as the batch grows, so each sequence's share shrinks (default: no budget)")
    g.add_argument("--cpu-fp32-gemm", choices=CPU_FP32_GEMM_MODES, default="auto",
                   help="bf16 models on the CPU: keep an fp32 copy of each linear layer (not the LM head) for "
                   "GEMMs over many rows (prefill), where CPUs without AMX run bf16 at half the fp32 speed; "
                   "costs twice the bf16 weights in memory. auto: only if that fits in half the available "
                   "memory (default: auto)")


def _named_dir(text: str) -> tuple[str, str]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise SystemExit(f"--extra-head expects NAME=DIR, got {text!r}")
    return name, directory


def _device_list(value: str) -> list[str]:
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("expected one or more comma-separated devices")
    return devices


def add_spec_args(parser: argparse.ArgumentParser, default_policy: str | None = None) -> None:
    g = parser.add_argument_group("speculation")
    g.add_argument("--policy", choices=POLICY_NAMES, default=default_policy, help="stop policy")
    g.add_argument("--k", type=int, help="candidates per round (constant) / start length (heuristic)")
    g.add_argument("--threshold", type=float, help="specdec++ stop threshold in (0, 1)")
    g.add_argument("--bounds", type=int, nargs=2, metavar=("MIN", "MAX"), help="candidate length bounds")
    g.add_argument("--p-min", type=float, help="confidence policy: stop below this draft probability")


def spec_from_args(args: argparse.Namespace) -> SpecConfig:
    """A validated SpecConfig from the flags given (others keep their defaults)."""
    fields = {"policy": args.policy, "k": args.k, "threshold": args.threshold, "p_min": args.p_min}
    if args.bounds is not None:
        fields["bounds"] = tuple(args.bounds)
    return SpecConfig.model_validate({k: v for k, v in fields.items() if v is not None})


def engine_config_from_args(args: argparse.Namespace, default_spec: SpecConfig | None = None) -> EngineConfig:
    return EngineConfig(
        target=args.target,
        draft=args.draft,
        head=args.head,
        extra_heads=tuple(_named_dir(text) for text in args.extra_head),
        dtype=args.dtype,
        draft_dtype=args.draft_dtype,
        draft_device=args.draft_device,
        target_devices=args.target_devices,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        batching=args.batching,
        spec_disable_batch_size=args.spec_disable_batch_size,
        spec_batch_candidates=args.spec_batch_candidates,
        cpu_fp32_gemm=args.cpu_fp32_gemm,
        default_spec=default_spec or SpecConfig(),
    )
