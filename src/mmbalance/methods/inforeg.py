"""InfoReg: adaptive unimodal regulation in the prime learning window (Huang, Wei, Yang, Hu, CVPR 2025),
as a plugin for any objective.

Early in training an information-rich modality takes most of the
information; InfoReg measures it by the trace of each encoder's (empirical)
Fisher information and, while that trace still rises fast (the *prime
learning window*), slows the modality that is ahead of the others with a
proximal pull toward its weights at the start of the epoch, so the weaker
modalities can catch up.

Per epoch t (``on_epoch_start``): w0_m ← copy of encoder m's parameters;
open_m ← t ≥ 2 and (T_m[t−1] − T_m[t−2]) / T_m[t−1] > K. Per step, from the
fusion-restricted logits d_m (BASELINES §1.1), s_m = batch mean of
log p(d_m)[y]; Δ_m = mean over the modalities m' with s_m' < s_m of
(s_m − s_m') (0 if none); α_m = exp(β·tanh Δ_m). After backward: the trace
accumulator A_m += Σ‖grad‖² over encoder m's parameters (before the
regulation), then, inside the modulation window, for every m with open_m
and Δ_m > 0, grad += α_m·(w − w0_m) on encoder m's parameters (the gradient
of (α_m/2)‖w − w0_m‖², α_m a constant). At the epoch's end T_m[t] = A_m / n.
``unimodal_weight`` adds Σ_m CE(d_m, y) (1: the paper's InfoReg*).

``variant=code`` is the authors' released main.py (two modalities; the
dataset's first plays its audio, the second its visual): scores are batch
sums of p(d_m)[y], α_first = 0.95·exp(tanh gap) when the first is ahead,
α_second = 0.1·exp(tanh(−gap)) when the second is; one window flag for both
from the first modality's trace, k_t = (T[t−1] − T[t−11]) / Σ_{i=t−10}^{t−1} T[i]
(T before epoch 0 is 0, k_0 = 1) > 0.05; the trace is Σ over weight
matrices/kernels (parameters with ≥ 2 dimensions) of mean(Σ_steps g²),
g the gradient after the regulation; the unimodal loss is on (weight 1).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..errors import ConfigError
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin, cross_entropy
from .window import WindowConfig, in_window

#: epochs of trace history kept: the code variant's rule reads T[t−11] .. T[t−1]
HISTORY = 11
CODE_LOOKBACK = 10
COEFFICIENTS = "inforeg/coefficients"


# -- the method's core, on plain tensors ---------------------------------------------------------
def log_probability_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """[M]: s_m = batch mean of log softmax(d_m)[y] from logits [M, B, C] (higher is better).

    The paper's Eq. 8 writes the negative of this (an NLL), which would
    regulate the worse modality; its text and code regulate the better one.
    """
    log_p = logits.detach().float().log_softmax(-1)
    labels = labels.expand(log_p.shape[:-1])
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).mean(-1)


def probability_sums(logits: Tensor, labels: Tensor) -> Tensor:
    """[M]: S_m = batch sum of softmax(d_m)[y] from logits [M, B, C] (the released code's score)."""
    p = logits.detach().float().softmax(-1)
    labels = labels.expand(p.shape[:-1])
    return p.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)


def score_gaps(scores: Tensor) -> Tensor:
    """[M]: Δ_m = mean over {m' : s_m' < s_m} of (s_m − s_m'), 0 when no modality scores lower (Eqs. 9–10).

    The lowest-scoring modality always gets 0, so it is never regulated.
    """
    differences = scores.unsqueeze(1) - scores.unsqueeze(0)  # [m, m'] = s_m − s_m'
    below = differences > 0
    count = below.sum(1)
    total = torch.where(below, differences, torch.zeros_like(differences)).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def regulation_coefficients(gaps: Tensor, beta: float, factors: Optional[Tensor] = None) -> Tensor:
    """[M]: α_m = factor_m · exp(β·tanh Δ_m) where Δ_m > 0, else 0 (no regulation).

    α jumps from 0 to at least ``factor_m`` as soon as a modality is ahead;
    the paper intends this. ``factors``: the code variant's 0.95 / 0.1.
    """
    alpha = torch.exp(beta * torch.tanh(gaps))
    if factors is not None:
        alpha = alpha * factors
    return torch.where(gaps > 0, alpha, torch.zeros_like(alpha))


def prime_window(history: Tensor, epochs_seen: int | Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """The paper's window from per-epoch traces [M, H] (oldest first, last column T[t−1]).

    Returns (ratio, open): ratio_m = (T_m[t−1] − T_m[t−2]) / T_m[t−1] (0 when
    fewer than two epochs were traced or T_m[t−1] = 0), open_m = ratio_m > K
    with at least two traced epochs.
    """
    last, before = history[:, -1], history[:, -2]
    defined = (last != 0) & (torch.as_tensor(epochs_seen, device=history.device) >= 2)
    ratio = torch.where(defined, (last - before) / torch.where(last != 0, last, torch.ones_like(last)), torch.zeros_like(last))
    return ratio, defined & (ratio > threshold)


def code_window(history: Tensor, epochs_seen: int | Tensor, threshold: float, lookback: int = CODE_LOOKBACK) -> tuple[Tensor, Tensor]:
    """The released code's window from traces [M, H ≥ lookback + 1] (oldest first; missing epochs are 0).

    k_t = (T[t−1] − T[t−1−lookback]) / Σ_{i=t−lookback}^{t−1} T[i], k_0 = 1
    (k = 0 when the sum is 0 after epoch 0); open = k > K. Every row is
    computed; the code variant uses the first modality's flag for all.
    """
    recent = history[:, -lookback:]
    total = recent.sum(1)
    k = torch.where(total != 0, (history[:, -1] - history[:, -1 - lookback]) / torch.where(total != 0, total, torch.ones_like(total)),
                    torch.zeros_like(total))
    first = torch.as_tensor(epochs_seen, device=history.device) == 0
    k = torch.where(first, torch.ones_like(k), k)
    return k, k > threshold


def squared_gradient_norm(grads: list[Tensor]) -> Tensor:
    """Σ‖g‖² over a list of gradients: one step's contribution to the paper's Fisher trace."""
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()


def code_gradient_trace(grads: list[Tensor]) -> Tensor:
    """Σ over gradients with ≥ 2 dimensions (Conv/Linear weights) of mean(g²): the code's per-step trace."""
    kept = [g.float() for g in grads if g.dim() >= 2]
    if not kept:
        return torch.zeros(()) if not grads else grads[0].new_zeros((), dtype=torch.float32)
    return torch.stack([g.square().mean() for g in kept]).sum()


@torch.no_grad()
def add_proximal_gradient_(params: list[Tensor], anchors: list[Tensor], coefficient: Tensor | float) -> None:
    """grad += α·(w − w0) for each parameter: the gradient of (α/2)‖w − w0‖², α a constant.

    Parameters without a gradient are left without one (the optimizer then
    skips them, as a step that did not reach them intends).
    """
    pairs = [(p, a) for p, a in zip(params, anchors) if p.grad is not None]
    if not pairs:
        return
    grads = [p.grad for p, _ in pairs]
    pulls = torch._foreach_sub([p.detach() for p, _ in pairs], [a for _, a in pairs])
    coefficient = coefficient.detach().to(grads[0].dtype) if isinstance(coefficient, Tensor) else coefficient
    torch._foreach_mul_(pulls, coefficient)
    torch._foreach_add_(grads, pulls)


class _Anchor(nn.Module):
    """w0 of one encoder: one buffer per parameter, in ``ctx.params.encoder[m]`` order."""

    def __init__(self, params: list[Tensor]):
        super().__init__()
        self.count = len(params)
        for i, p in enumerate(params):
            self.register_buffer(f"w{i}", p.detach().clone())

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.count)]


@METHODS.register("inforeg")
class InfoReg(Plugin):
    """Proximal regulation of the leading modality in its prime learning window (Huang et al., CVPR 2025)."""

    class Config(WindowConfig):
        variant: Literal["paper", "code"] = Field(
            "paper",
            description="paper: log-probability scores, per-modality windows, Fisher trace before regulation; "
            "code (the authors' main.py, 2 modalities): probability sums, 0.95/0.1 factors, one window "
            "from the first modality's 10-epoch trace slope, trace after regulation",
        )
        beta: Optional[float] = Field(
            None, ge=0, le=100, description="β in α = exp(β·tanh Δ); unset: 0.9 (paper), 1 (code)"
        )
        threshold: Optional[float] = Field(
            None, ge=0, le=100, description="K, the window opens while the trace's rise rate exceeds it; unset: 0.04 (paper), 0.05 (code)"
        )
        unimodal_weight: Optional[float] = Field(
            None, ge=0, le=1000,
            description="weight of Σ_m CE(unimodal logits, y) added to the objective's loss (1: InfoReg*); unset: 0 (paper), 1 (code)",
        )
        score_logits: Literal["fusion", "heads"] = Field(
            "fusion",
            description="unimodal logits of the scores and the unimodal loss: d_m from the fusion head (the code), "
            "or the objective's unimodal heads",
        )
        code_factors: list[Annotated[float, Field(gt=0, le=100)]] = Field(
            [0.95, 0.1], min_length=2, max_length=2,
            description="variant=code: factors of α for the first (the code's audio) and the second modality",
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options inforeg`)
    search_space = {
        "beta": FloatRange(0.3, 3.0, log=True),
        "threshold": FloatRange(0.01, 0.2, log=True),
    }

    auxiliary_options = ("unimodal_weight",)

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        count = len(self.modalities)
        if config.variant == "code" and count != 2:
            raise ConfigError(
                f"inforeg.variant=code is the authors' two-modality code (audio, visual); the dataset has {count} "
                f"modalities ({', '.join(self.modalities)}); use inforeg.variant=paper"
            )
        self.register_buffer("trace_history", torch.zeros(count, HISTORY))  # T_m, oldest first, last = T[t−1]
        self.register_buffer("epochs_traced", torch.zeros((), dtype=torch.long))
        self.register_buffer("trace_sum", torch.zeros(count))  # A_m of the running epoch
        self.register_buffer("trace_steps", torch.zeros((), dtype=torch.long))  # n
        self.register_buffer("window_open", torch.zeros(count, dtype=torch.bool))
        self.register_buffer("window_ratio", torch.zeros(count))
        self.anchors = nn.ModuleList()  # w0_m, built in setup once the encoders are known

    # -- resolved options ------------------------------------------------------------------------
    @property
    def code(self) -> bool:
        return self.config.variant == "code"

    @property
    def beta(self) -> float:
        return self.config.beta if self.config.beta is not None else (1.0 if self.code else 0.9)

    @property
    def threshold(self) -> float:
        return self.config.threshold if self.config.threshold is not None else (0.05 if self.code else 0.04)

    @property
    def unimodal_weight(self) -> float:
        weight = self.config.unimodal_weight
        return weight if weight is not None else (1.0 if self.code else 0.0)

    # -- hooks -------------------------------------------------------------------------------------
    def setup(self, model, ctx):
        self._build_anchors(ctx)

    def _build_anchors(self, ctx) -> None:
        self.anchors = nn.ModuleList([_Anchor(ctx.params.encoder[m]) for m in self.modalities])

    @torch.no_grad()
    def on_epoch_start(self, model, ctx):
        if len(self.anchors) != len(self.modalities):  # used without setup
            self._build_anchors(ctx)
        self.trace_sum.zero_()
        self.trace_steps.zero_()
        if self.code:
            ratio, flags = code_window(self.trace_history, self.epochs_traced, self.threshold)
            flags = flags[:1].expand_as(flags)  # the code's one flag, from its audio (first) modality
        else:
            ratio, flags = prime_window(self.trace_history, self.epochs_traced, self.threshold)
        self.window_ratio.copy_(ratio)
        self.window_open.copy_(flags)
        for m, anchor in zip(self.modalities, self.anchors):
            params = ctx.params.encoder[m]
            if len(params) != anchor.count:
                raise RuntimeError(f"inforeg: encoder '{m}' has {len(params)} parameters, its snapshot {anchor.count}")
            torch._foreach_copy_(anchor.tensors(), [p.detach() for p in params])

    def _unimodal_logits(self, record) -> Tensor:
        if self.config.score_logits == "fusion":
            return record.restricted_logits()
        if record.unimodal is None or any(m not in record.unimodal for m in self.modalities):
            raise ConfigError(
                "inforeg.score_logits=heads needs an objective with unimodal heads (e.g. joint, midas); "
                "use inforeg.score_logits=fusion"
            )
        return torch.stack([record.unimodal[m] for m in self.modalities])

    def on_forward(self, record, ctx):
        logits = self._unimodal_logits(record)
        weight = self.unimodal_weight
        if weight > 0:
            record.add_loss("inforeg_unimodal", weight * sum(cross_entropy(z, record.batch) for z in logits))
        with torch.no_grad():
            scorer = probability_sums if self.code else log_probability_scores
            scores = ctx.dist.mean(scorer(logits, record.labels))
            gaps = score_gaps(scores)
            factors = torch.tensor(self.config.code_factors, device=gaps.device) if self.code else None
            alpha = regulation_coefficients(gaps, self.beta, factors)
            regulating = in_window(self.config, ctx.epoch)
            applied = alpha * self.window_open.to(alpha.dtype) if regulating else torch.zeros_like(alpha)
        if regulating:
            record.shared[COEFFICIENTS] = applied
        record.logs["inforeg/regulating"] = float(regulating)
        for slot, m in enumerate(self.modalities):
            record.logs[f"inforeg/score/{m}"] = scores[slot]
            record.logs[f"inforeg/gap/{m}"] = gaps[slot]
            record.logs[f"inforeg/alpha/{m}"] = applied[slot]

    @torch.no_grad()
    def after_backward(self, record, ctx):
        coefficients = None if record is None else record.shared.get(COEFFICIENTS)
        if len(self.anchors) != len(self.modalities):
            raise RuntimeError("inforeg: on_epoch_start must run before the first step (it snapshots w0)")
        traces = []
        for slot, (m, anchor) in enumerate(zip(self.modalities, self.anchors)):
            params = ctx.params.encoder[m]
            if not self.code:  # the paper's trace reads the gradient of the loss, before the regulation
                traces.append(squared_gradient_norm([p.grad for p in params if p.grad is not None]))
            if coefficients is not None:
                add_proximal_gradient_(params, anchor.tensors(), coefficients[slot])
            if self.code:  # the code's reads the final gradient
                traces.append(code_gradient_trace([p.grad for p in params if p.grad is not None]))
        self.trace_sum.add_(torch.stack([t.to(self.trace_sum.device) for t in traces]))
        self.trace_steps.add_(1)

    @torch.no_grad()
    def on_epoch_end(self, model, ctx):
        if self.code:
            trace = self.trace_sum.clone()  # Σ over the epoch's steps
        else:
            trace = self.trace_sum / self.trace_steps.clamp_min(1)
        self.trace_history.copy_(torch.cat([self.trace_history[:, 1:], trace.unsqueeze(1)], dim=1))
        self.epochs_traced.add_(1)
        values = torch.stack([trace, self.window_open.float(), self.window_ratio]).tolist()
        logs = {}
        for name, row in zip(("trace", "open", "window_ratio"), values):
            logs.update({f"inforeg/{name}/{m}": value for m, value in zip(self.modalities, row)})
        return logs
