"""`specdecpp models`: pull the default pair, convert a GGUF file or check an HF directory, list the cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="pull, convert and list models", description=__doc__)
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    pull = msub.add_parser("pull", help="download and convert the default target/draft pair (once)")
    pull.add_argument("--only", choices=["target", "draft"], help="pull just one of the pair")
    pull.set_defaults(func=run_pull)

    convert = msub.add_parser("convert", help="convert a GGUF file into the cache, or check an HF directory")
    convert.add_argument("path", type=Path, help="a .gguf file or a Hugging Face model directory")
    convert.add_argument("--name", help="cache name and identity for a GGUF file (default: the file's stem)")
    convert.set_defaults(func=run_convert)

    ls = msub.add_parser("list", help="show the cached models")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=run_list)


def run_pull(args: argparse.Namespace) -> int:
    from specdecpp.model_store import DEFAULT_DRAFT, DEFAULT_TARGET, pull

    roles = {"target": DEFAULT_TARGET, "draft": DEFAULT_DRAFT}
    for role, source in roles.items():
        if args.only in (None, role):
            print(f"{role}\t{pull(source)}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from specdecpp.model_store import check_hf_dir, convert_file

    path: Path = args.path.expanduser()
    if path.is_dir():
        if args.name:
            raise ValueError("--name applies to GGUF files; an HF directory is used in place")
        for key, value in check_hf_dir(path).items():
            print(f"{key}: {value}")
        print(f"ok: use it with --target {path} (or --draft {path})")
        return 0
    if path.suffix != ".gguf":
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    print(convert_file(path, args.name))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from specdecpp.model_store import list_models, models_dir

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    if not models:
        print(f"no models in {models_dir()}; run `specdecpp models pull`")
        return 0
    width = max(len(m["name"]) for m in models)
    for m in models:
        print(f"{m['name']:<{width}}  {m['size_bytes'] / 2**30:6.2f} GiB  {m['identity']:<30}  {m['path']}")
    return 0
