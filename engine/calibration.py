"""Online calibration of the acceptance head: P(accept) = sigmoid(A z + B) over the head's raw logit z,
refitted while serving from the exact labels every verification yields.

The head ships with a Platt calibration fitted offline (`HeadConfig.calibration`); a deployment's
prompts may differ from the training data, so its probabilities drift from the truth there, and the
stop rule and threshold "auto" (engine/tuning.py) both multiply them. After each verification every
judged candidate has an exact label a_s = min(1, p_s(y_s) / q_s(y_s)); the calibrator keeps the last
`window` (z, predicted, a_s) triples in fixed-size ring buffers and, every `refit_every` labels once it
has `min_labels`, refits (A, B) by a few damped Newton steps of the soft-label logistic loss (two
parameters: cheap), starting from the current fit, with a small ridge toward the shipped calibration.
There is one calibrator per head and temperature band (greedy labels are 0/1, sampled ones soft, and a
deployment's mix of the two changes over time). Nothing is persisted: an engine starts from the head's
shipped calibration.

Stop decisions use (A, B) as fitted from earlier rounds only, so the output stays lossless (any stop
rule that reads only the past keeps rejection sampling exact; docs/design.md).

The same ring gives the reliability table (`BINS` equal-width bins of the predicted P(accept): count,
mean predicted, mean realized) and the expected calibration error (ECE) over the recent window,
which the engine reports to the server (`HeadCalibration`) for Prometheus.
"""

from __future__ import annotations

import torch

from engine.events import HeadCalibration
from engine.head import AcceptanceHead
from engine.params import SamplingParams

WINDOW = 2048  # the most recent judged candidates a calibrator keeps: its refit data and reliability table
REFIT_EVERY = 128  # labels between two refits
MIN_LABELS = 256  # labels seen before a calibrator departs from the head's shipped calibration
NEWTON_STEPS = 4  # per refit, each from the last fit: a refit follows a drift, it does not start over
PRIOR_WEIGHT = 1.0  # ridge toward the shipped (A, B), in labels' worth: keeps a fit on uniform labels sane
BINS = 10  # equal-width bins of predicted P(accept) in the reliability table
BANDS = ("greedy", "sampled")


def temperature_band(params: SamplingParams) -> str:
    """The calibrator band of a request: greedy (0/1 labels) or sampled (soft labels)."""
    return "greedy" if params.greedy else "sampled"


def reliability_table(
    predicted: torch.Tensor, realized: torch.Tensor, bins: int = BINS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per equal-width bin of `predicted`: (count, sum of predicted, sum of realized), float64 [bins] each."""
    predicted, realized = predicted.double(), realized.double()
    index = (predicted * bins).long().clamp(0, bins - 1)
    zeros = torch.zeros(bins, dtype=torch.float64)
    return (zeros.index_add(0, index, torch.ones_like(predicted)), zeros.index_add(0, index, predicted),
            zeros.index_add(0, index, realized))


def expected_calibration_error(predicted: torch.Tensor, realized: torch.Tensor, bins: int = BINS) -> float:
    """Sum over bins of (share of candidates) x |mean predicted - mean realized|."""
    _, sum_predicted, sum_realized = reliability_table(predicted, realized, bins)
    return float((sum_predicted - sum_realized).abs().sum() / max(len(predicted), 1))


def platt_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, weight: float) -> float:
    """Soft-label logistic loss of sigmoid(x @ theta) against y, plus the ridge toward `prior`."""
    u = x @ theta
    return float((torch.nn.functional.softplus(u) - y * u).sum() + 0.5 * weight * (theta - prior).square().sum())


def refit_platt(
    z: torch.Tensor, y: torch.Tensor, start: tuple[float, float], prior: tuple[float, float],
    weight: float = PRIOR_WEIGHT, steps: int = NEWTON_STEPS,
) -> tuple[float, float]:
    """(A, B) lowering the soft-label logistic loss of sigmoid(A z + B) against y: Newton steps from
    `start`, each halved until the loss decreases (saturated sigmoids make a full step overshoot)."""
    x = torch.stack([z.double(), torch.ones_like(z, dtype=torch.float64)], dim=-1)
    y, prior_t = y.double(), torch.tensor(prior, dtype=torch.float64)
    theta = torch.tensor(start, dtype=torch.float64)
    loss = platt_loss(theta, x, y, prior_t, weight)
    for _ in range(steps):
        s = torch.sigmoid(x @ theta)
        grad = x.T @ (s - y) + weight * (theta - prior_t)
        hessian = (x.T * (s * (1 - s))) @ x + weight * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hessian, grad)
        for _ in range(20):
            candidate = theta - step
            candidate_loss = platt_loss(candidate, x, y, prior_t, weight)
            if candidate_loss <= loss:
                theta, loss = candidate, candidate_loss
                break
            step = step / 2
    return float(theta[0]), float(theta[1])


class OnlineCalibrator:
    """One head's (and band's) P(accept) = sigmoid(A z + B), refitted from its recent exact labels."""

    def __init__(
        self, scale: float, bias: float, learning: bool = True, window: int = WINDOW,
        refit_every: int = REFIT_EVERY, min_labels: int = MIN_LABELS,
    ) -> None:
        self.shipped = (float(scale), float(bias))
        self.scale, self.bias = self.shipped
        self.learning = learning  # False: keep the shipped calibration, only measure it
        self.window, self.refit_every, self.min_labels = window, refit_every, min_labels
        # Ring buffers of the last `window` judged candidates: head logit, P(accept) used, exact label.
        self._logits = [0.0] * window
        self._predicted = [0.0] * window
        self._realized = [0.0] * window
        self._next = 0
        self.size = 0  # filled entries of the ring
        self.labels_seen = 0
        self._since_refit = 0

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(accept) of head logits under the current fit (the head's `calibrated`, with this A and B)."""
        return torch.sigmoid(logits.float() * self.scale + self.bias)

    def observe(self, logits: list[float], predicted: list[float], realized: list[float]) -> None:
        """Judged candidates of a verified round: their logits, the P(accept) the stop rule used, their a_s."""
        for z, p, a in zip(logits, predicted, realized, strict=True):
            i = self._next
            self._logits[i], self._predicted[i], self._realized[i] = z, p, a
            self._next = (i + 1) % self.window
        self.size = min(self.size + len(logits), self.window)
        self.labels_seen += len(logits)
        self._since_refit += len(logits)
        if self.learning and self.labels_seen >= self.min_labels and self._since_refit >= self.refit_every:
            self.refit()

    def refit(self) -> None:
        """Refit (A, B) on the ring's labels."""
        self._since_refit = 0
        n = self.size
        z, y = torch.tensor(self._logits[:n], dtype=torch.float64), torch.tensor(self._realized[:n])
        scale, bias = refit_platt(z, y, (self.scale, self.bias), self.shipped)
        if torch.isfinite(torch.tensor([scale, bias])).all():
            self.scale, self.bias = scale, bias

    def snapshot(self, head: str, band: str) -> HeadCalibration:
        """The calibrator's state and its reliability over the ring, for the server's metrics."""
        n = self.size
        predicted, realized = torch.tensor(self._predicted[:n]), torch.tensor(self._realized[:n])
        counts, sum_predicted, sum_realized = reliability_table(predicted, realized)
        bins = [(int(c), float(sp / c) if c else 0.0, float(sr / c) if c else 0.0)
                for c, sp, sr in zip(counts, sum_predicted, sum_realized, strict=True)]
        error = expected_calibration_error(predicted, realized) if n else None
        return HeadCalibration(head, band, self.scale, self.bias, self.labels_seen, error, bins)


class Calibrators:
    """The deployment's online calibrators: one per loaded head and temperature band."""

    def __init__(self, heads: dict[str, AcceptanceHead], learning: bool = True) -> None:
        self.heads, self.learning = heads, learning  # the engine's own dict: a head loaded later is calibrated too
        self.calibrators: dict[tuple[str, str], OnlineCalibrator] = {}
        for name in heads:
            for band in BANDS:
                self._calibrator(name, band)

    def _calibrator(self, head: str, band: str) -> OnlineCalibrator:
        """The calibrator of `head` in `band`, started from the head's shipped calibration on first use."""
        if (head, band) not in self.calibrators:
            shipped = self.heads[head].config.calibration
            self.calibrators[(head, band)] = OnlineCalibrator(shipped["scale"], shipped["bias"], self.learning)
        return self.calibrators[(head, band)]

    def for_request(self, head: str, params: SamplingParams) -> OnlineCalibrator:
        return self._calibrator(head, temperature_band(params))

    @property
    def labels_seen(self) -> int:
        return sum(c.labels_seen for c in self.calibrators.values())

    def snapshots(self) -> list[HeadCalibration]:
        return [c.snapshot(head, band) for (head, band), c in self.calibrators.items()]
