"""A live `specdecpp serve` on tiny random models, for the server tests.

The tiny target, draft (sharing the character tokenizer) and a random acceptance head are
saved as ordinary model directories, so the spawned engine process loads them from a plain
EngineConfig exactly as it would load real models. The server runs under the benchmark's
launcher (specdecpp/bench/serving.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
from tiny import CHEAP_DRAFT_COSTS

from engine.head import AcceptanceHead
from specdecpp.bench.serving import ServerProcess
from specdecpp.bench.serving import free_port as free_port  # re-exported for the tests

TARGET_NAME = "tiny-target"
DRAFT_NAME = "tiny-draft"
# A fixed speculation structure for tests that compare two seeded requests token for token: the specdec++
# rule's rounds follow live state (online calibration, the acceptance estimate, the cost model), so under it a
# seed fixes the output's distribution, not its exact tokens from one request to the next.
SEED_REPRODUCIBLE = {"policy": "constant", "k": 4}


def save_tiny_pair(root: Path, target, draft, tokenizer, head: AcceptanceHead) -> dict[str, Path]:
    """Save target, draft (sharing `tokenizer`) and `head` under `root`; their directories by role."""
    paths = {"target": root / TARGET_NAME, "draft": root / DRAFT_NAME, "head": root / "tiny-head"}
    for key, model in (("target", target), ("draft", draft)):
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    head.config.draft_id = DRAFT_NAME  # the identity the engine derives from the draft's directory name
    head.save(paths["head"])
    return paths


class LiveServer(ServerProcess):
    """The tiny models served in fp32 on one thread; errors carry the server's log."""

    def __init__(self, paths: dict[str, Path], log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        costs = log_path.parent / "cheap-draft-costs.json"  # threshold "auto" speculates on the tiny pair
        CHEAP_DRAFT_COSTS.save(costs)
        serve_args = [
            "--target", str(paths["target"]), "--draft", str(paths["draft"]), "--head", str(paths["head"]),
            "--dtype", "fp32", "--shutdown-grace", "2", "--cost-model", str(costs), *extra_args,
        ]
        super().__init__(serve_args, log_path, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})

    def wait_healthy(self, timeout: float = 180.0) -> None:
        try:
            super().wait_healthy(timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{self.log()}") from None

    def engine_pid(self) -> int:
        """The spawned engine process (not multiprocessing's resource tracker)."""
        for child in psutil.Process(self.process.pid).children():
            if any("spawn_main" in part for part in child.cmdline()):
                return child.pid
        raise LookupError("no engine process found")

    def stop(self) -> int:
        """SIGINT, as Ctrl-C would: the tests check the graceful exit code."""
        return super().stop(signal.SIGINT, timeout=30)


def serve(paths: dict[str, Path], log_dir: Path, extra_args: tuple[str, ...] = (),
          check_exit: bool = False) -> Iterator[LiveServer]:
    """A module fixture's body (`yield from serve(...)`): the tiny models in `paths` served until the module
    ends; `check_exit` also asserts the graceful exit code of Ctrl-C."""
    live = LiveServer(paths, log_dir / "server.log", extra_args)
    try:
        live.wait_healthy()
        yield live
    finally:
        code = live.stop()
        assert not check_exit or code in (0, 130, -signal.SIGINT), live.log()


def openai_client(server: LiveServer, api_key: str = "none", timeout: float = 120) -> openai.OpenAI:
    """The official SDK against `server`, without retries (a retry would hide a failure)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=timeout)
