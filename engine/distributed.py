"""Tensor parallelism of the target: the ranks, their process group, and the plan rank 0 sends each step.

Rank 0 is the engine process (the server's engine worker, or the `specdecpp` command itself): it alone
owns the request queue and the scheduler. Ranks 1..N-1, the followers, run `python -m engine.distributed`:
rank 0 starts them on its own host, or torchrun starts every rank (`torchrun ... -m engine.distributed
generate ...`: rank 0 runs the command, the others follow). Every rank loads its 1/N shard of the target
with transformers' TP plan and a whole replica of the draft and head. Then, each step:

  rank 0:     StepPlan(the adds and aborts since the last step, shared state) --broadcast--> followers
  every rank: applies the plan to its own LLMEngine and steps it; the target's forwards all-reduce inside

All ranks run the same code on the same inputs, so they take the same decisions: each request carries a
seed rank 0 drew (`LLMEngine.add_request`), and whatever rank 0 decides from its own clock travels in
`StepPlan.shared` (`LLMEngine.shared_state`). Followers discard their events. The plan travels on a gloo
group of its own (plain Python objects, CPU), the forwards' collectives on NCCL (CUDA) or gloo (CPU).

Failure: a follower rank 0 started dies with it (PR_SET_PDEATHSIG), and rank 0 exits as soon as one of
them dies (`Ranks.watch`), so the server's supervisor restarts the whole set and fails the requests in
flight cleanly. Under torchrun, torchrun's agent does both.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from engine.events import AbortRequest, AddRequest

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.loading.placement import Placement

log = logging.getLogger(__name__)

# An idle server waits for its next plan as long as it stays idle: no timeout that means anything.
PLAN_TIMEOUT = timedelta(days=365)
WATCH_SECONDS = 0.2  # how often rank 0 checks that its followers live
PARENT_ENV = "SPECDECPP_PARENT_PID"  # set for the followers rank 0 starts: they die with that process
PR_SET_PDEATHSIG = 1


def is_tensor_parallel(module: torch.nn.Module) -> bool:
    """True for a module holding tensor-parallel shards (DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def check_divides_heads(model_config: Any, tensor_parallel_size: int) -> None:
    """Refuse a TP size that does not split the attention heads and KV heads evenly over the ranks."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tensor_parallel_size or kv_heads % tensor_parallel_size:
        raise ValueError(
            f"--tensor-parallel-size {tensor_parallel_size} must divide the target's {heads} attention heads and "
            f"{kv_heads} KV heads; choose a divisor of {kv_heads}")


@dataclass
class StepPlan:
    """What rank 0 decided before a step: followers apply it, then step (or leave, on `stop`)."""

    messages: list[AddRequest | AbortRequest] = field(default_factory=list)  # in the order rank 0 applied them
    shared: dict = field(default_factory=dict)  # LLMEngine.shared_state() of rank 0
    stop: bool = False


class Ranks:
    """Rank 0's view of the ranks: it records the requests it admits and aborts, and sends them with its
    shared state before each step (`publish`)."""

    def __init__(self, plan_group: Any, followers: list[subprocess.Popen]) -> None:
        self.plan_group = plan_group
        self.followers = followers  # the ones this process started (none under torchrun)
        self.pending: list[AddRequest | AbortRequest] = []
        self.stopping = False

    def record(self, message: AddRequest | AbortRequest) -> None:
        self.pending.append(message)

    def publish(self, engine: LLMEngine) -> None:
        plan = StepPlan(self.pending, engine.shared_state())
        self.pending = []
        send(plan, self.plan_group)

    def share(self, obj: Any) -> None:
        """Send the followers something rank 0 decided while starting (its config, its kernel choices)."""
        send(obj, self.plan_group)

    def watch(self) -> None:
        """Exit this process as soon as a follower dies: the ranks cannot go on without it, and the
        server's supervisor restarts all of them."""
        def check() -> None:
            while not self.stopping:
                for process in self.followers:
                    if process.poll() is not None and not self.stopping:
                        log.error("rank process %d exited (code %s); stopping the engine", process.pid,
                                  process.returncode)
                        logging.shutdown()
                        os._exit(1)
                time.sleep(WATCH_SECONDS)

        if self.followers:
            threading.Thread(target=check, name="rank-watch", daemon=True).start()

    def close(self, timeout: float = 30.0) -> None:
        """Tell the followers to leave and wait for them (the engine is shutting down; also at exit).
        Once only, and bounded: a follower that cannot hear it any more must not keep this process alive."""
        if self.stopping:
            return
        self.stopping = True
        sender = threading.Thread(target=send, args=(StepPlan(stop=True), self.plan_group), daemon=True)
        sender.start()
        sender.join(timeout)
        for process in self.followers:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()


def abandon(exc: Exception) -> None:
    """A rank's round failed (a collective lost its peer, or an error only this rank saw): the ranks can
    no longer step in lockstep, so this process exits at once, as when a follower dies, and the server's
    supervisor restarts all ranks; requests in flight end with `engine_unavailable`."""
    log.error("a tensor-parallel round failed (%s: %s); stopping this rank", type(exc).__name__, exc)
    logging.shutdown()
    os._exit(1)


def send(obj: Any, group: Any) -> None:
    dist.broadcast_object_list([obj], src=0, group=group)


def receive(group: Any) -> Any:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# ----- starting and joining ---------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def start_followers(world_size: int) -> tuple[list[subprocess.Popen], dict[str, str]]:
    """Start ranks 1..N-1 on this host; returns them and the rendezvous of rank 0 (this process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
              "OMP_NUM_THREADS": str(torch.get_num_threads())}  # every rank runs as many threads as rank 0
    followers = []
    for rank in range(1, world_size):
        env = {**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(rank), PARENT_ENV: str(os.getpid())}
        followers.append(subprocess.Popen([sys.executable, "-m", "engine.distributed"], env=env,
                                          stdout=subprocess.DEVNULL))
    return followers, {**common, "RANK": "0", "LOCAL_RANK": "0"}


def join_group(env: Mapping[str, str]) -> Any:
    """Join the process group `env` describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK, as
    torchrun sets them): NCCL on CUDA, gloo on the CPU. Returns the gloo group the plans travel on.
    Under torchrun the rendezvous goes through its agent's store (env://)."""
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", rank))
    init_method = "env://" if launched_by_torchrun() else f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    rendezvous = {"init_method": init_method, "rank": rank, "world_size": world_size}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), **rendezvous)
    else:
        dist.init_process_group("gloo", **rendezvous)
    return dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)


def die_with_parent() -> None:
    """A follower rank 0 started exits when rank 0 does, however it ends (Linux; elsewhere a no-op)."""
    parent = os.environ.get(PARENT_ENV)
    libc = ctypes.CDLL(None, use_errno=True)
    if parent is None or not hasattr(libc, "prctl"):
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # rank 0 died before the line above
        os._exit(1)


def build_rank_zero(config: EngineConfig) -> LLMEngine:
    """Start (or, under torchrun, join) the ranks and load this rank's shard: rank 0's engine, which
    publishes a plan before each step. The followers take its decisions: the resolved config with its
    KV budget (every scheduler admits alike) and the draft's measured kernels (every draft proposes alike)."""
    from engine.costs import CostModel
    from engine.factory import assemble_engine, load_models, resolve_paths, with_planned_kv_budget
    from engine.loading.inventory import load_model_config, plan_from_config

    world_size = config.tensor_parallel_size
    target, draft, head = resolve_paths(config)
    check_divides_heads(load_model_config(target), world_size)
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size or int(os.environ["RANK"]) != 0:
            raise ValueError(f"under torchrun, --tensor-parallel-size ({world_size}) must equal the world size "
                             f"({os.environ['WORLD_SIZE']}) and the command must run on rank 0")
        followers, env = [], dict(os.environ)
    else:
        followers, env = start_followers(world_size)
    ranks = Ranks(join_group(env), followers)
    ranks.watch()
    atexit.register(ranks.close)  # a command that ends lets its followers go (the server closes them itself)
    config = dataclasses.replace(config, target=target, draft=draft or "none")
    ranks.share(config.to_dict())
    placement = agreed_kv_budget(plan_from_config(config, target, draft), ranks.plan_group)
    config = with_planned_kv_budget(config, placement)
    # All ranks load at once; rank 0 measures its draft's kernels, sends them, and then every rank times the
    # cost model's target forwards together (they all-reduce). Rank 0's model reaches the followers with
    # each step's shared state.
    engine = assemble_engine(config, load_models(config, target, draft, head, placement), measure_costs_now=False)
    ranks.share(draft_decisions(engine))
    engine.start_self_tuning(CostModel.load(config.cost_model) if config.cost_model else None)
    engine.lockstep, engine.on_round_failure = ranks, abandon
    log.info("rank 0 of %d ready", world_size)
    return engine


def agreed_kv_budget(placement: Placement, plan_group: Any) -> Placement:
    """`placement` with the KV budget of the tightest rank's GPU (every rank calls this at the same point),
    so every scheduler admits the same and none runs its GPU out of memory."""
    unlimited = 1 << 62
    budget = torch.tensor([unlimited if placement.kv_cache_tokens is None else placement.kv_cache_tokens])
    dist.all_reduce(budget, op=dist.ReduceOp.MIN, group=plan_group)
    agreed = int(budget.item())
    return dataclasses.replace(placement, kv_cache_tokens=None if agreed == unlimited else agreed)


def draft_decisions(engine: LLMEngine) -> dict:
    """What rank 0 measured or sized for its draft replica: its kernel choice, whether its linears
    keep fp32 copies (the TP target is not packed), and each head's kernels (every rank must stop its
    rounds where rank 0 does)."""
    from engine.loading.cpu_linear import PackedLinear

    heads = {name: kernels["quantization"] for name, kernels in engine.head_kernels.items()}
    if engine.draft is None:
        return {"draft_kernels": None, "cpu_fp32_gemm": "off", "head_quantization": heads}
    copies = any(isinstance(m, PackedLinear) and m.fp32_copy for m in engine.draft.model.modules())
    return {"draft_kernels": engine.draft.kernels, "cpu_fp32_gemm": "on" if copies else "off",
            "head_quantization": heads}


def follow(engine: LLMEngine, plan_group: Any) -> None:
    """A follower's loop: apply each plan to this rank's engine and step it, until told to stop."""
    while True:
        plan: StepPlan = receive(plan_group)
        if plan.stop:
            return
        for message in plan.messages:
            if isinstance(message, AddRequest):
                engine.add_request(message.request_id, message.prompt, message.params, message.spec, message.n)
            else:
                engine.abort(message.request_id)
        engine.apply_shared_state(plan.shared)
        engine.step()  # the events are rank 0's to send


def run_follower() -> None:
    """A follower rank: join, take rank 0's config, load this rank's shard and replicas with rank 0's
    draft decisions, follow."""
    from engine.config import EngineConfig
    from engine.factory import assemble_engine, load_models, resolve_paths, with_planned_kv_budget
    from engine.loading.inventory import plan_from_config

    die_with_parent()
    plan_group = join_group(os.environ)
    config = EngineConfig.from_dict(receive(plan_group))
    target, draft, head = resolve_paths(config)
    placement = agreed_kv_budget(plan_from_config(config, target, draft), plan_group)
    config = with_planned_kv_budget(config, placement)
    models = load_models(config, target, draft, head, placement)
    decisions = receive(plan_group)
    config = dataclasses.replace(config, cpu_fp32_gemm=decisions["cpu_fp32_gemm"])
    engine = assemble_engine(config, models, decisions["draft_kernels"], head_kernels=decisions["head_quantization"])
    engine.on_round_failure = abandon
    follow(engine, plan_group)
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    """`python -m engine.distributed`: a follower; under torchrun, rank 0 runs `specdecpp ARGS` instead."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=os.environ.get("SPECDECPP_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s %(levelname)s rank{rank}[%(process)d]: %(message)s")
    if rank == 0:
        from specdecpp.cli import main as cli_main

        return cli_main(argv)
    run_follower()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
