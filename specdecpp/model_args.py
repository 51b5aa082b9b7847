"""Model, placement, batching and speculation flags shared by generate, serve and bench.

The engine flags come from EngineConfig's fields (engine/config.py): each field's metadata holds
its flag and help text, its default is the flag's default, and its type says how the flag
parses. So the arguments, the config built from them, and the flags that reproduce a config
(`config_flags`, for a server the benchmark starts) cannot drift apart.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import Field, fields, is_dataclass, replace
from typing import Any, get_args, get_origin, get_type_hints

from engine.config import EngineConfig
from engine.params import AUTO, POLICY_NAMES, SpecConfig


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """One argument per flagged EngineConfig field: the top-level ones under "models", each nested
    config (the scheduler) under its own group."""
    _add_config_args(parser, parser.add_argument_group("models"), EngineConfig)


def engine_config_from_args(args: argparse.Namespace, default_spec: SpecConfig | None = None) -> EngineConfig:
    """The EngineConfig the flags of `add_model_args` describe."""
    return replace(_config_from_args(EngineConfig, args), default_spec=default_spec or SpecConfig())


def config_flags(config: Any) -> list[str]:
    """Command-line flags that rebuild `config` (an EngineConfig or a nested config): every flag
    whose value is set (None is the flag's absence), a switch only where it is flipped."""
    out: list[str] = []
    for f, hint in _config_fields(type(config)):
        value = getattr(config, f.name)
        if is_dataclass(hint):
            out += config_flags(value)
            continue
        if "flag" not in f.metadata or value is None:
            continue
        flag, kind = f.metadata["flag"], _kind(hint)
        if kind == "switch":
            out += [flag] if value != f.default else []
        elif kind == "list":
            out += [flag, ",".join(value)]
        elif kind == "pairs":
            out += [item for name, text in value for item in (flag, f"{name}={text}")]
        else:
            out += [flag, str(value)]
    return out


def _add_config_args(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup, cls: type) -> None:
    for f, hint in _config_fields(cls):
        if is_dataclass(hint):
            _add_config_args(parser, parser.add_argument_group(f.metadata["group"]), hint)
        elif "flag" in f.metadata:
            extras = {key: value for key, value in f.metadata.items() if key != "flag"}
            group.add_argument(f.metadata["flag"], dest=f.name, **_argparse_settings(f, hint), **extras)


def _argparse_settings(f: Field, hint: Any) -> dict:
    """argparse's action, type and default for a field, from its type and default."""
    kind = _kind(hint)
    if kind == "switch":
        return {"action": "store_false" if f.default else "store_true"}
    if kind == "list":
        return {"type": _device_list, "default": f.default}
    if kind == "pairs":
        return {"action": "append", "default": list(f.default)}  # NAME=VALUE texts, split when the config is built
    value_type = _value_type(hint)
    return {"default": f.default, **({"type": value_type} if value_type is not str else {})}


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    values = {}
    for f, hint in _config_fields(cls):
        if is_dataclass(hint):
            values[f.name] = _config_from_args(hint, args)
        elif "flag" in f.metadata:
            parsed = getattr(args, f.name)
            values[f.name] = tuple(_pair(f, text) for text in parsed) if _kind(hint) == "pairs" else parsed
    return cls(**values)


def _pair(f: Field, text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"{f.metadata['flag']} expects {f.metadata['metavar']}, got {text!r}")
    return name, value


def _device_list(value: str) -> list[str]:
    """The one list field's values (--target-devices), comma-separated."""
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("expected one or more comma-separated devices")
    return devices


def _config_fields(cls: type) -> list[tuple[Field, Any]]:
    """(field, resolved type) of a config dataclass, in declaration order."""
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields(cls)]


def _kind(hint: Any) -> str:
    """How a field's flag parses: "switch" (bool), "list" (comma-separated values), "pairs"
    (repeatable NAME=VALUE), or "value" (one value, int or str)."""
    value_type = _value_type(hint)
    if value_type is bool:
        return "switch"
    return {list: "list", tuple: "pairs"}.get(get_origin(value_type), "value")


def _value_type(hint: Any) -> Any:
    """`int | None` -> int: the type a set value has."""
    if isinstance(hint, types.UnionType):
        return next(t for t in get_args(hint) if t is not type(None))
    return hint


def threshold_arg(text: str) -> float | str:
    """A --threshold value: "auto" or a number."""
    return AUTO if text == AUTO else float(text)


def add_spec_args(parser: argparse.ArgumentParser, default_policy: str | None = None) -> None:
    g = parser.add_argument_group("speculation")
    g.add_argument("--policy", choices=POLICY_NAMES, default=default_policy, help="stop policy")
    g.add_argument("--k", type=int, help="candidates per round (constant) / start length (heuristic)")
    g.add_argument("--threshold", type=threshold_arg,
                   help='specdec++ stop threshold in (0, 1), or "auto": derived each round from the measured costs '
                        '(default: auto)')
    g.add_argument("--bounds", type=int, nargs=2, metavar=("MIN", "MAX"), help="candidate length bounds")
    g.add_argument("--p-min", type=float, help="confidence policy: stop below this draft probability")
    g.add_argument("--num-drafts", type=int, help="draft paths per round, verified jointly (default 1)")


def spec_from_args(args: argparse.Namespace) -> SpecConfig:
    """A validated SpecConfig from the flags given (others keep their defaults)."""
    given = {"policy": args.policy, "k": args.k, "threshold": args.threshold, "p_min": args.p_min,
             "num_drafts": args.num_drafts}
    if args.bounds is not None:
        given["bounds"] = tuple(args.bounds)
    return SpecConfig.model_validate({k: v for k, v in given.items() if v is not None})
