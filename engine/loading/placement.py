"""Where each model goes: draft + head on one device, the target on one device or sharded.

Pure decisions: `plan_placement` is a function of a GPU inventory and model footprints; it
decides devices and per-GPU memory budgets and fails with a clear message when the models
cannot fit, before anything loads. `shard_device_map` turns a sharded target's budgets into
an explicit layer -> GPU map. Gathering the real inventory and footprints from this machine
and the model configs is `engine.loading.inventory` (its `plan_from_config` is the entry point).

Defaults: N >= 2 GPUs: draft and head on GPU 0, target over the others (and GPU 0 too,
with what the draft leaves, only if the others are too small). One GPU: both on it. None: CPU.
With tensor parallelism (`plan_tensor_parallel`) every rank's GPU holds 1/N of the target's
weights and KV cache next to a full replica of the draft and head.

On GPUs the planner also sizes the KV budget (`Placement.kv_cache_tokens`): the tokens of
cache that fit in what the weights leave, so the scheduler never admits more than the GPUs
hold. On the CPU the cache grows in host memory and the budget is the flag's alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1 << 30
RESERVE_FRACTION = 0.05  # of each device's total memory: CUDA context, activations, allocator slack


class PlacementError(ValueError):
    """A device request that cannot be honoured (unknown device, mixed CPU and GPU target)."""


class InsufficientMemoryError(PlacementError):
    """The models do not fit on the devices chosen; raised before anything loads."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    total_bytes: int
    free_bytes: int
    name: str = ""


@dataclass(frozen=True)
class Footprint:
    """Bytes a model needs on its devices: weights (sharded by layer) plus runtime extras (KV cache, head)."""

    weight_bytes: int
    extra_bytes: int = 0
    kv_bytes_per_token: int = 0  # 0: unknown, no KV budget is derived
    kv_tokens: int = 0  # the tokens of KV cache counted in extra_bytes

    @property
    def static_bytes(self) -> int:
        """What does not grow with the cache: weights and the head."""
        return self.total - self.kv_bytes_per_token * self.kv_tokens

    @property
    def total(self) -> int:
        return self.weight_bytes + self.extra_bytes


@dataclass
class Placement:
    draft_device: str
    target_device: str | None  # a single device, or None when sharded with a device map
    target_device_map: dict | str | None = None
    target_max_memory: dict[int, int] | None = None  # per-GPU weight budget (bytes) when sharded
    notes: list[str] = field(default_factory=list)  # the planner's reasoning, for the log
    tensor_parallel_size: int = 1  # > 1: the target loads as this rank's shard (transformers' TP plan)
    kv_cache_tokens: int | None = None  # the KV tokens the GPUs hold next to the weights (None: not limited)

    def describe_target(self) -> str:
        if self.tensor_parallel_size > 1:
            return f"{self.target_device}, 1/{self.tensor_parallel_size} of it per rank (tensor parallel)"
        if self.target_device is not None:
            return self.target_device
        if isinstance(self.target_device_map, dict):
            counts: dict[str, int] = {}
            for dev in self.target_device_map.values():
                counts[_device_name(dev)] = counts.get(_device_name(dev), 0) + 1
            return "sharded: " + ", ".join(f"{d} ({n} modules)" for d, n in counts.items())
        gpus = ", ".join(f"cuda:{i}" for i in self.target_max_memory or {})
        return f"sharded over {gpus} (device map {self.target_device_map!r})"


def fmt_bytes(n: float) -> str:
    """'1.5 GiB' or '300.0 MiB': sizes in messages and logs."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.1f} MiB"


def _device_name(dev: int | str) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(dev)


def normalize_device(name: str, gpus: list[GpuInfo]) -> str:
    """'cpu' | 'cuda' | 'cuda:N' | 'N' -> 'cpu' or 'cuda:N', checked against the inventory."""
    text = str(name).strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "cuda":
        text = "cuda:0"
    if text.isdigit():
        text = f"cuda:{text}"
    if text.startswith("cuda:") and text[5:].isdigit():
        index = int(text[5:])
        known = [g.index for g in gpus]
        if index not in known:
            seen = ", ".join(f"cuda:{i}" for i in known) or "none"
            raise PlacementError(f"device {name!r} requested but the visible GPUs are: {seen}")
        return text
    raise PlacementError(f"unknown device {name!r}; use cpu, cuda, cuda:N or N")


def plan_placement(
    gpus: list[GpuInfo],
    target: Footprint | int,
    draft: Footprint | int | None,
    draft_device: str | None = None,
    target_devices: list[str] | None = None,
    reserve_fraction: float = RESERVE_FRACTION,
    cpu_bytes: int | None = None,
) -> Placement:
    """Decide devices and budgets; raise InsufficientMemoryError if the models cannot fit.

    `target` / `draft` are footprints (or plain byte counts); `draft` None means no draft.
    `cpu_bytes` is the host memory available (None: not checked). Each device keeps
    `reserve_fraction` of its total memory free.
    """
    target = _as_footprint(target)
    draft = _as_footprint(draft) if draft is not None else None
    budget = _usable_memory(gpus, reserve_fraction, cpu_bytes)
    notes: list[str] = []
    draft_dev = normalize_device(draft_device, gpus) if draft_device else ("cuda:0" if gpus else "cpu")
    if draft is not None:
        _reserve_draft(draft, draft_dev, budget, reserve_fraction, notes)
    candidates = _target_candidates(gpus, target_devices, draft_dev if draft is not None else None)
    devices = _fit_target(target, candidates, budget, reserve_fraction, draft is not None, notes)
    kv_tokens = _kv_budget(target, draft, devices, draft_dev, budget, notes)
    if len(devices) == 1:
        notes.append(f"target on {devices[0]}: {fmt_bytes(target.total)}")
        _note_cpu_cache(notes, budget, target, devices[0], "target", budget.get(devices[0], 0) - target.weight_bytes)
        return Placement(draft_device=draft_dev, target_device=devices[0], notes=notes, kv_cache_tokens=kv_tokens)
    max_memory = _shard_budgets(target, devices, budget)
    notes.append(
        f"target sharded over {', '.join(devices)}: {fmt_bytes(target.total)} in "
        + ", ".join(f"cuda:{i} <= {fmt_bytes(b)}" for i, b in max_memory.items())
    )
    return Placement(
        draft_device=draft_dev, target_device=None, target_device_map="auto", target_max_memory=max_memory, notes=notes,
        kv_cache_tokens=kv_tokens,
    )


def plan_tensor_parallel(
    gpu_count: int,
    gpu: GpuInfo | None,
    target: Footprint | int,
    draft: Footprint | int | None,
    tensor_parallel_size: int,
    reserve_fraction: float = RESERVE_FRACTION,
    cpu_bytes: int | None = None,
) -> Placement:
    """One rank's share: 1/N of the target's weights and KV, a whole draft and head, on its GPU `gpu`
    (ranks 0..N-1 of a node use GPUs 0..N-1; each rank probes only its own), or on the CPU when the
    node has no GPU (`gpu_count` 0). Raises before anything loads when the GPU cannot hold its share
    plus one full-length sequence of KV. The KV budget is this GPU's; the ranks take the smallest
    (engine/distributed.py)."""
    n = tensor_parallel_size
    target = _as_footprint(target)
    draft = _as_footprint(draft) if draft is not None else Footprint(0)
    if gpu_count == 0 or gpu is None:
        need = target.weight_bytes + n * draft.weight_bytes  # the shards add up to one target; n drafts
        if cpu_bytes is not None and need > cpu_bytes * (1 - reserve_fraction):
            raise InsufficientMemoryError(
                f"not enough host memory for {n} tensor-parallel ranks: the target's shards and {n} drafts need "
                f"{fmt_bytes(need)}, {fmt_bytes(cpu_bytes * (1 - reserve_fraction))} usable")
        notes = [f"target over {n} CPU ranks (tensor parallel), a draft replica on each"]
        return Placement(draft_device="cpu", target_device="cpu", notes=notes, tensor_parallel_size=n)
    if gpu_count < n:
        raise PlacementError(f"--tensor-parallel-size {n} needs {n} GPUs on each node; {gpu_count} visible")
    device = f"cuda:{gpu.index}"
    budget = _usable_memory([gpu], reserve_fraction, None)
    shard = Footprint(target.weight_bytes // n + 1, target.extra_bytes // n + 1,
                      -(-target.kv_bytes_per_token // n), target.kv_tokens)
    per_rank = Footprint(shard.weight_bytes + draft.weight_bytes, shard.extra_bytes + draft.extra_bytes,
                         shard.kv_bytes_per_token + draft.kv_bytes_per_token, target.kv_tokens)
    if per_rank.total > budget[device]:
        raise InsufficientMemoryError(
            f"not enough memory for tensor parallelism over {n} GPUs: each needs "
            f"{_describe_need(per_rank, [device], 'KV cache and head')} (1/{n} of the target, a whole draft), "
            f"{device} has {_room(budget, device)} after reserving {reserve_fraction:.0%}. "
            "Use more GPUs (--tensor-parallel-size), a smaller --dtype, or a smaller draft."
        )
    kv_tokens = _tokens_that_fit(budget[device], per_rank)
    notes = [f"1/{n} of the target (tensor parallel) and a draft replica on {device}: {fmt_bytes(per_rank.total)}; "
             f"KV room for {kv_tokens} tokens"]
    return Placement(draft_device=device, target_device=device, notes=notes, tensor_parallel_size=n,
                     kv_cache_tokens=kv_tokens)


def _tokens_that_fit(usable: int, fp: Footprint) -> int | None:
    """Tokens of KV cache (`fp.kv_bytes_per_token` each) that `usable` bytes hold next to `fp`'s static part."""
    if fp.kv_bytes_per_token <= 0:
        return None
    return max(usable - fp.static_bytes, 0) // fp.kv_bytes_per_token


def _kv_budget(
    target: Footprint, draft: Footprint | None, devices: list[str], draft_dev: str, budget: dict[str, int],
    notes: list[str],
) -> int | None:
    """The KV tokens the GPUs hold after the weights (None on the CPU or when the sizes are unknown).

    The target's GPUs are one pool (a layer map puts each layer's cache next to its weights, in the
    proportion `_shard_budgets` keeps); `budget` has the draft's static share taken already. A draft
    on a GPU of its own limits the budget by its own cache."""
    if not all(d.startswith("cuda:") and d in budget for d in devices):
        return None
    usable = sum(max(budget[d], 0) for d in devices)
    per_token = target.kv_bytes_per_token
    if draft is not None and draft_dev in devices:
        per_token += draft.kv_bytes_per_token
        usable += draft.kv_bytes_per_token * draft.kv_tokens  # taken with the draft's reserve; counted per token
    tokens = _tokens_that_fit(usable, Footprint(target.static_bytes, 0, per_token, 0))
    if draft is not None and draft_dev not in devices and draft_dev in budget and draft.kv_bytes_per_token:
        own = (budget[draft_dev] + draft.kv_bytes_per_token * draft.kv_tokens) // draft.kv_bytes_per_token
        tokens = own if tokens is None else min(tokens, own)
    if tokens is not None:
        notes.append(f"KV budget: {tokens} tokens fit next to the weights")
    return tokens


def _as_footprint(fp: Footprint | int) -> Footprint:
    return fp if isinstance(fp, Footprint) else Footprint(int(fp))


def _usable_memory(gpus: list[GpuInfo], reserve_fraction: float, cpu_bytes: int | None) -> dict[str, int]:
    """Bytes each device can give the models: free memory less the reserve (host RAM only when known)."""
    budget = {f"cuda:{g.index}": g.free_bytes - int(reserve_fraction * g.total_bytes) for g in gpus}
    if cpu_bytes is not None:
        budget["cpu"] = int(cpu_bytes * (1 - reserve_fraction))
    return budget


def _need(fp: Footprint, devices: list[str]) -> int:
    """Bytes `fp` must find on `devices`.

    GPU memory must hold the KV cache up front. Host RAM is checked for the weights only: the
    cache grows with use, so a full-length one that may not fit is a note, not a refusal.
    """
    return fp.weight_bytes if devices == ["cpu"] else fp.total


def _describe_need(fp: Footprint, devices: list[str], extra: str) -> str:
    if devices == ["cpu"]:
        return f"{fmt_bytes(fp.weight_bytes)} of weights"
    return f"{fmt_bytes(fp.total)} (weights {fmt_bytes(fp.weight_bytes)} + {extra} {fmt_bytes(fp.extra_bytes)})"


def _room(budget: dict[str, int], dev: str) -> str:
    return f"{fmt_bytes(max(budget[dev], 0))} usable" if dev in budget else "unknown"


def _note_cpu_cache(notes: list[str], budget: dict[str, int], fp: Footprint, dev: str, what: str, left: int) -> None:
    """Note a model on the CPU whose weights fit but whose full-length KV cache may not."""
    if dev == "cpu" and dev in budget and fp.extra_bytes > left:
        notes.append(f"{what}: a full-length KV cache ({fmt_bytes(fp.extra_bytes)}) may not fit in the RAM left")


def _reserve_draft(
    draft: Footprint, draft_dev: str, budget: dict[str, int], reserve_fraction: float, notes: list[str]
) -> None:
    """Take the draft's and head's share of `draft_dev` first: they are small and must sit on one device."""
    if draft_dev in budget and _need(draft, [draft_dev]) > budget[draft_dev]:
        raise InsufficientMemoryError(
            f"not enough memory for the draft and head on {draft_dev}: they need "
            f"{_describe_need(draft, [draft_dev], 'KV cache and head')}, "
            f"{draft_dev} has {_room(budget, draft_dev)} after reserving {reserve_fraction:.0%}. "
            "Choose another --draft-device or a smaller --draft-dtype."
        )
    if draft_dev in budget:
        budget[draft_dev] -= _need(draft, [draft_dev])
    notes.append(f"draft + head on {draft_dev}: {fmt_bytes(draft.total)}")
    _note_cpu_cache(notes, budget, draft, draft_dev, "draft", budget.get(draft_dev, 0))


def _target_candidates(gpus: list[GpuInfo], target_devices: list[str] | None, draft_dev: str | None) -> list[list[str]]:
    """The device lists to try for the target, in order: the explicit ones, or the default rule.

    `draft_dev` is the draft's device (None: no draft).
    """
    if target_devices:
        devices = list(dict.fromkeys(normalize_device(d, gpus) for d in target_devices))
        if "cpu" in devices and len(devices) > 1:
            raise PlacementError("--target-devices cannot mix cpu and GPUs (no CPU offload); list GPUs only or cpu")
        return [devices]
    if not gpus:
        return [["cpu"]]
    if len(gpus) == 1:
        return [["cuda:0"]]
    all_gpus = [f"cuda:{g.index}" for g in gpus]
    others = [d for d in all_gpus if d != draft_dev]
    # The others first; GPU 0 joins (with what the draft leaves) only if they are too small.
    return [others, all_gpus] if others != all_gpus else [all_gpus]


def _fit_target(
    target: Footprint,
    candidates: list[list[str]],
    budget: dict[str, int],
    reserve_fraction: float,
    has_draft: bool,
    notes: list[str],
) -> list[str]:
    """The first candidate with room for the target (noting each one passed over); raise if none has."""
    for i, devices in enumerate(candidates):
        usable = sum(max(budget.get(d, 0), 0) for d in devices)
        unchecked = any(d not in budget for d in devices)
        if unchecked or _need(target, devices) <= usable:
            return devices
        if i + 1 < len(candidates):
            notes.append(
                f"target ({fmt_bytes(target.total)}) does not fit on {', '.join(devices)} "
                f"({fmt_bytes(usable)} usable); "
                f"adding {', '.join(d for d in candidates[i + 1] if d not in devices)}"
            )
    raise InsufficientMemoryError(
        f"not enough memory for the target: it needs {_describe_need(target, devices, 'KV cache')}, "
        f"{', '.join(devices)} {'has' if len(devices) == 1 else 'have'} {fmt_bytes(usable)} usable "
        f"({'; '.join(f'{d}: {_room(budget, d)}' for d in devices)}; {reserve_fraction:.0%} of each reserved"
        + (", the draft's share already taken)" if has_draft else ")")
        + ". Add GPUs (--target-devices), use a smaller --dtype, or a smaller target."
    )


def _shard_budgets(target: Footprint, devices: list[str], budget: dict[str, int]) -> dict[int, int]:
    """Each GPU's weight budget: its usable memory scaled so the KV cache, which lands with the
    layers, still fits next to them."""
    weight_share = target.weight_bytes / target.total if target.total else 1.0
    return {int(d.split(":")[1]): int(max(budget[d], 0) * weight_share) for d in devices}


def shard_device_map(meta_model, max_memory: dict[int, int]) -> dict[str, int | str]:
    """The layer -> GPU map transformers' device_map="auto" would build, limited to `max_memory`'s GPUs.

    Pure: works on a meta-device model, touches no GPU. Raises if some module would spill
    to CPU or disk, i.e. the target fits in total but not layer by layer.
    """
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    no_split = meta_model._no_split_modules
    balanced = get_balanced_memory(meta_model, max_memory=dict(max_memory), no_split_module_classes=no_split)
    # Balanced first (layers spread evenly); if that spills (it caps all but the last GPU at an even
    # share, which fails when the last GPU is the smallest), fill the GPUs in order up to their budgets.
    for budgets in (balanced, dict(max_memory)):
        device_map = infer_auto_device_map(meta_model, max_memory=budgets, no_split_module_classes=no_split)
        spilled = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
        if not spilled:
            return device_map
    raise InsufficientMemoryError(
        f"the target's layers do not fit on GPUs {sorted(max_memory)} (some would go to {', '.join(spilled)}); "
        "add GPUs with --target-devices or use a smaller --dtype"
    )
