"""EngineConfig: the one source of the engine flags, their defaults, and the spawned engine's config."""

from __future__ import annotations

import json

import pytest

from engine.config import EngineConfig, SchedulerConfig
from engine.params import SpecConfig
from specdecpp.cli import build_parser
from specdecpp.model_args import config_flags, engine_config_from_args

EVERY_FLAG = ["--target", "t", "--draft", "d", "--head", "h", "--extra-head", "a=x", "--extra-head", "b=y",
              "--dtype", "fp16", "--draft-dtype", "fp32", "--draft-device", "cpu", "--target-devices", "cuda:1, cuda:2",
              "--max-model-len", "256", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
              "--kv-cache-tokens", "999", "--no-batching", "--speculative-disable-by-batch-size", "4",
              "--speculative-batch-candidates", "8", "--cpu-fp32-gemm", "off", "--cpu-row-padding", "off",
              "--max-over-acceptance", "0.1"]


def _config(*argv: str) -> EngineConfig:
    return engine_config_from_args(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("command", [["serve"], ["generate", "hi"], ["bench", "offline"],
                                     ["bench", "serving", "--start-server"]])
def test_flag_defaults_are_the_config_defaults(command):
    assert engine_config_from_args(build_parser().parse_args(command)) == EngineConfig()


def test_every_flag_lands_in_its_field():
    config = _config(*EVERY_FLAG)
    assert config == EngineConfig(
        target="t", draft="d", head="h", extra_heads=(("a", "x"), ("b", "y")), dtype="fp16", draft_dtype="fp32",
        draft_device="cpu", target_devices=["cuda:1", "cuda:2"], max_model_len=256,
        scheduler=SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, kv_cache_tokens=999, batching=False,
                                  spec_disable_batch_size=4, spec_batch_candidates=8),
        cpu_fp32_gemm="off", cpu_row_padding="off", max_over_acceptance=0.1,
    )
    assert _config(*config_flags(config)) == config  # the flags a started server gets rebuild it


def test_engine_process_config_round_trips_through_json():
    config = _config(*EVERY_FLAG)
    config.default_spec = SpecConfig(policy="constant", k=3)
    data = json.loads(json.dumps(config.to_dict()))  # what crosses the process boundary
    assert data["scheduler"]["max_num_seqs"] == 3
    assert EngineConfig.from_dict(data) == config


def test_bad_values_fail_before_any_model_loads():
    with pytest.raises(SystemExit, match="--extra-head expects NAME=DIR"):
        _config("--extra-head", "nodir")
    with pytest.raises(ValueError, match="max_num_seqs"):
        _config("--max-num-seqs", "0")
    with pytest.raises(ValueError, match="max_over_acceptance"):
        _config("--max-over-acceptance", "-0.1")
