"""A live `specdecpp serve` on tiny random models, for the server tests.

The tiny target, draft (sharing the character tokenizer) and a random acceptance head are
saved as ordinary model directories, so the spawned engine process loads them from a plain
EngineConfig exactly as it would load real models.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from engine.head import AcceptanceHead

TARGET_NAME = "tiny-target"
DRAFT_NAME = "tiny-draft"


def save_tiny_pair(root: Path, target, draft, tokenizer, head: AcceptanceHead) -> dict[str, Path]:
    """Save target, draft (sharing `tokenizer`) and `head` under `root`; their directories by role."""
    paths = {"target": root / TARGET_NAME, "draft": root / DRAFT_NAME, "head": root / "tiny-head"}
    for key, model in (("target", target), ("draft", draft)):
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    head.config.draft_id = DRAFT_NAME  # the identity the engine derives from the draft's directory name
    head.save(paths["head"])
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m specdecpp.cli serve ...` in a subprocess on a free loopback port."""

    def __init__(self, paths: dict[str, Path], log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [
            sys.executable, "-m", "specdecpp.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--target", str(paths["target"]), "--draft", str(paths["draft"]), "--head", str(paths["head"]),
            "--dtype", "fp32", "--shutdown-grace", "2", *extra_args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def engine_pid(self) -> int:
        """The spawned engine process (not multiprocessing's resource tracker)."""
        for child in psutil.Process(self.process.pid).children():
            if any("spawn_main" in part for part in child.cmdline()):
                return child.pid
        raise LookupError("no engine process found")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
