"""The theory rows' own report (multi-draft, over-acceptance): predicted decode speedups under two cost
models, and the over-acceptance bias measured on a tiny model.

Why predictions: the measured rows show this host only. The same rows' acceptance (tokens per target
call with M paths of k // M candidates each), priced by another cost model, shows where the extra
paths pay on a machine whose verification is flat and whose draft is cheap, as a GPU serving the
paper's 7B/70B pair. Why a tiny model: the bias TV(output, target) of the real pair cannot be measured
by sampling over a 151,936-token vocabulary; on a 6-token pair it can, next to the theory's exact value.
"""

from __future__ import annotations

from collections import Counter

import torch

from engine.costs import CostModel
from engine.params import SamplingParams
from engine.sampling import over_acceptance_output, processed_probs, verify

# A GPU where decoding is memory-bound (the paper's 7B/70B pair): a draft step costs a tenth of a target
# forward, and neither grows with the rows up to 64. Units: one target forward.
MEMORY_BOUND_GPU = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 64: 1.0},
                             draft_batch={1: 0.1, 64: 0.1}, refresh=False)
TINY_VOCAB = 6
TINY_SAMPLES = 20000


def predicted_speedup(row: dict, costs: CostModel) -> float | None:
    """The decode speedup over the target alone that a constant row's tokens per target call give under
    `costs`: a round drafts k // M candidates on each of its M paths (one batched draft step per
    candidate) and verifies them in one target forward where each path is a row of its own, the
    sequence's uncached token and the path's candidates (engine/multidraft.py)."""
    if row["policy"] == "none":
        return 1.0
    if row["policy"] != "constant" or not row.get("tokens_per_target_call"):
        return None
    paths = row.get("num_drafts", 1)
    per_path = int(row["knob"]) // paths
    draft = per_path * (costs.draft_seconds(paths) + paths * costs.candidate_seconds(False, False))
    round_seconds = draft + costs.target_seconds(paths * (1 + per_path), sequences=paths)
    return row["tokens_per_target_call"] * costs.target_seconds(1) / round_seconds


def add_predictions(rows: list[dict], costs: dict[str, CostModel]) -> None:
    """`predicted_speedup` under each named cost model, as `predicted_speedup_<name>` on every row."""
    for row in rows:
        for name, model in costs.items():
            row[f"predicted_speedup_{name}"] = predicted_speedup(row, model)


def theory_comparisons(rows: list[dict], complete: dict) -> list[dict]:
    """Each theory row's tokens/s over the plain constant row of its k and temperature (one path, lossless),
    with a paired bootstrap 95% interval by prompt. `complete`: `offline.complete_records`, keyed by config."""
    from specdecpp.bench.offline import paired_bootstrap_ratio

    by_label = {config.label: records for config, records in complete.items()}
    plain = {(r["knob"], r["temperature"]): r for r in rows
             if r["policy"] == "constant" and r["num_drafts"] == 1 and r["lossless"]}
    out = []
    for row in rows:
        base = plain.get((row["knob"], row["temperature"]))
        if row["policy"] != "constant" or base is None or base is row:
            continue
        a, b = by_label[row["label"]], by_label[base["label"]]
        value, low, high = paired_bootstrap_ratio(
            [r["stats"]["generated_tokens"] for r in a], [r["wall_seconds"] for r in a],
            [r["stats"]["generated_tokens"] for r in b], [r["wall_seconds"] for r in b])
        out.append({"a": row["label"], "b": base["label"], "ratio": value, "ci_low": low, "ci_high": high,
                    "prompts": len(a)})
    return out


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def uno_output(p: torch.Tensor, q: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Decoding-UNO's output distribution: the same over-acceptance min(q, p + epsilon), but a rejection
    redraws from the target p itself rather than the residual (the comparison the theory's rule wins)."""
    accepted = torch.minimum(q, p + epsilon)
    return accepted + (1.0 - accepted.sum()) * p


def tiny_pair_distributions(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-token distributions p (target) and q (draft) of two random 1-layer Qwen2 models over
    `TINY_VOCAB` tokens, their LM heads sharpened so that p and q differ a lot."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def model(model_seed: int) -> Qwen2ForCausalLM:
        torch.manual_seed(model_seed)
        config = Qwen2Config(vocab_size=TINY_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        m = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():
            m.lm_head.weight.mul_(10.0)
        return m

    ids, params = torch.tensor([[1, 2, 3]]), SamplingParams(temperature=1.0)
    with torch.no_grad():
        p, q = (processed_probs(model(seed + i)(ids).logits[0, -1], params) for i in (10, 11))
    return p.float(), q.float()


def tiny_model_bias(epsilons: list[float], samples: int = TINY_SAMPLES, seed: int = 0) -> list[dict]:
    """Per epsilon: the bias TV(output, p) of one-candidate rounds through `verify` (the engine's acceptance
    rule) on the tiny pair, measured from `samples` rounds, next to the theory's value, its rejection
    probability, and Decoding-UNO's bias (a rejection redrawn from p itself) at the same epsilon."""
    p, q = tiny_pair_distributions(seed)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for epsilon in epsilons:
        counts: Counter = Counter()
        drafts = torch.multinomial(q, samples, replacement=True, generator=generator)
        for y in drafts:
            verdict = verify(y.view(1), q.unsqueeze(0), torch.stack([p, p]), generator, epsilon)
            counts[int(y) if verdict.num_accepted == 1 else verdict.next_token] += 1
        empirical = torch.tensor([counts.get(v, 0) / samples for v in range(TINY_VOCAB)])
        output, rejection = over_acceptance_output(p, q, epsilon)
        uno = uno_output(p, q, epsilon)
        out.append({"epsilon": epsilon, "tv_measured": round(total_variation(empirical, p), 4),
                    "tv_theory": round(total_variation(output, p), 4), "rejection_theory": round(float(rejection), 4),
                    "tv_pq": round(total_variation(p, q), 4), "tv_uno": round(total_variation(uno, p), 4),
                    "samples": samples})
    return out
