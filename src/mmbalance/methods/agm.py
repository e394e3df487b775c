"""AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, "Boosting Multi-modal Model
Performance with Adaptive Gradient Modulation", ICCV 2023), as a plugin for any objective.

The fused logits z are split into mono-modal responses φ_m with Shapley
weights over every coalition of the fusion head (BASELINES §3):

    F(S) = fuse(f^S) for every non-empty S ⊆ 𝓜 (F(𝓜) = z, the objective's fused logits),
    φ_m = Σ_{S ⊆ 𝓜∖{m}} |S|!(M−|S|−1)!/M! · [F(S ∪ {m}) − F(S)] + F(∅)/M,  Σ_m φ_m = z.

F(∅) cancels out of every φ_m (its weight is −1/M + 1/M), so 2^M − 1
coalitions are needed, z included. Per step, from the detached responses
(pooled across processes):

    s_m = mean_i −log max(softmax(φ_m,i)[y_i], 1e-8)            (how badly m fits the batch)
    r_m = exp(M/(M−1) · (mean_k s_k − s_m)),  r̂_m the same from the running averages ŝ_m
    κ_m = exp(α · min(r̂_m − r_m, cap))                          (κ_m = 1 outside the window)
    ŝ_m ← ŝ_m (t−1)/t + s_m / t                                  (t = steps so far, after κ)

``variant=response_hook`` (the paper's and the authors' rule, default): the
gradient that reaches the model through the fused logits becomes
Σ_m κ_m ∂φ_m/∂θ · g, where g = ∂L/∂z is whatever the loss sends to z. The
authors replace z by Σ_m φ'_m, φ'_m = κ_m φ_m + (1 − κ_m) φ_m.detach(), in
their own loss. A plugin cannot rewrite the objective's loss, so it adds a
term of value exactly 0 whose gradient is the difference:

    T = Σ_S w_S ⟨F(S), g⟩ − (same).detach(),   w_S = Σ_m (κ_m − 1) · C[m, S],

with C the response weights above (φ = C F) and g computed once by autograd
from the loss terms recorded so far. Since Σ_m C[m, S] is 1 for S = 𝓜 and 0
otherwise, CE(z) + T has exactly the authors' gradient. Every loss term
recorded before AGM's ``on_forward`` that reaches z (the objective's, and
those of plugins listed before ``agm``) is modulated; terms that do not pass
through z (MIDAS's misaligned and unimodal terms, ARL's auxiliary loss) are
left alone. Inside the window, when any element of a fusion-head weight
gradient leaves [−1, 1], every gradient is rescaled to global norm 1.

``variant=encoder_grad`` (BalanceMM): the responses are computed without
gradient, only for the scores; the objective's backward is untouched and
every ≥2-D encoder-m gradient is multiplied by κ_m in ``after_backward``
(so every loss term reaching the encoders is scaled); cap 7, clipping at
threshold 5 and norm 5. BalanceMM's opposite sign of r_m is not copied.

``zeroing=feature`` (default) zeroes features; ``input`` zeroes inputs and
encodes them again with the encoders in eval mode, as the authors' code
does (each encoder runs twice more, on its input and on zeros, and every
coalition is fused from those).

Cost: 2^M − 2 extra fusion-head passes per step (the singletons shared with
other plugins through the record's cache), all with gradient inside the
window under ``response_hook`` and their backward; one autograd pass from the
loss to z. With ``zeroing=input`` add 2·M encoder forward passes (and their
backward inside the window).
"""

from __future__ import annotations

import warnings
import weakref
from math import factorial, log
from typing import Literal, Optional

import torch
from pydantic import Field
from torch import Tensor

from ..errors import ConfigError
from ..evaluation.shapley import all_coalitions
from ..models.multimodal import zero_out
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Plugin
from .window import WindowConfig, in_window

SCORES = "agm/scores"
COEFFICIENTS = "agm/coefficients"
#: cap, clip threshold and clip norm of each variant (the paper's / authors' code, BalanceMM)
VARIANT_DEFAULTS = {"response_hook": (10.0, 1.0, 1.0), "encoder_grad": (7.0, 5.0, 5.0)}
#: above this many modalities the 2^M fusion passes per step get expensive
MANY_MODALITIES = 5


# -- the method's core, on plain tensors ------------------------------------------------------------

def response_matrix(modalities: list[str]) -> tuple[list[frozenset[str]], Tensor]:
    """The non-empty coalitions (``all_coalitions`` order, 𝓜 last) and C [M, K] with φ = C F.

    C[m, S] = (|S|−1)!(M−|S|)!/M! if m ∈ S, else −|S|!(M−|S|−1)!/M!. The empty
    coalition is left out: its Shapley weight −1/M and the equal share F(∅)/M
    cancel. Each column but 𝓜's sums to 0, 𝓜's to 1, so Σ_m φ_m = F(𝓜).
    """
    count = len(modalities)

    def weight(size: int) -> float:
        return factorial(size) * factorial(count - size - 1) / factorial(count)

    coalitions = [c for c in all_coalitions(modalities) if c]
    rows = [[weight(len(c) - 1) if m in c else -weight(len(c)) for c in coalitions] for m in modalities]
    return coalitions, torch.tensor(rows, dtype=torch.float64)


def mono_modal_responses(coalition_outputs: Tensor, matrix: Tensor) -> Tensor:
    """φ [M, B, C] from the coalition outputs F(S) [K, B, C] ordered as ``response_matrix``."""
    return torch.einsum("mk,kbc->mbc", matrix.to(coalition_outputs), coalition_outputs)


def response_scores(responses: Tensor, labels: Tensor, floor: float = 1e-8) -> Tensor:
    """s_m = batch mean of −log max(softmax(φ_m)[y], floor), from responses [M, B, C] (detached)."""
    nll = -responses.detach().float().log_softmax(-1).gather(-1, labels.expand(responses.shape[:2]).unsqueeze(-1)).squeeze(-1)
    return nll.clamp_max(-log(floor)).mean(-1)


def dominance_ratios(scores: Tensor, factor: Optional[float] = None) -> Tensor:
    """r_m = exp(factor · (mean_k s_k − s_m)); factor M/(M−1) unless given (2 modalities: r_a = e^{s_v − s_a})."""
    count = scores.numel()
    factor = count / (count - 1) if factor is None else factor
    return torch.exp(factor * (scores.mean() - scores))


def modulation_coefficients(scores: Tensor, averages: Tensor, alpha: float, cap: float,
                            factor: Optional[float] = None) -> dict[str, Tensor]:
    """κ_m = exp(α · min(r̂_m − r_m, cap)): the current ratio r pulled toward r̂ of the running averages."""
    ratio = dominance_ratios(scores, factor)
    target = dominance_ratios(averages.to(scores), factor)
    return {"ratio": ratio, "target": target, "coefficient": torch.exp(alpha * (target - ratio).clamp_max(cap))}


def running_average(average: Tensor, scores: Tensor, step: int | Tensor) -> Tensor:
    """ŝ (t−1)/t + s/t: the mean of the scores of steps 1..t (t counts from 1, over all epochs)."""
    return average * (step - 1) / step + scores / step


def modulation_term(coalition_outputs: Tensor, matrix: Tensor, coefficients: Tensor, fused_gradient: Tensor) -> Tensor:
    """A zero-valued term that turns the gradient g reaching F(𝓜) into Σ_m κ_m ∂φ_m/∂θ · g.

    ``coalition_outputs`` [K, B, C] with gradient (F(𝓜), the logits the loss
    was computed from, last); ``fused_gradient`` g = ∂L/∂F(𝓜), detached. Added to
    L, the gradient becomes g·∂F(𝓜) + Σ_S Σ_m (κ_m − 1) C[m, S] g·∂F(S), which is
    Σ_m κ_m g·∂φ_m because Σ_m C[m, S] is 1 for 𝓜 and 0 for every other S.
    """
    weights = (coefficients.to(matrix) - 1) @ matrix  # [K]
    products = (coalition_outputs.float() * fused_gradient.detach().float()).flatten(1).sum(-1)
    term = (weights.to(products) * products).sum()
    return term - term.detach()


def clip_when_fusion_gradient_exceeds(fusion_weights: list[Tensor], parameters: list[Tensor],
                                      threshold: float, max_norm: float) -> Tensor:
    """When any element of a fusion weight gradient lies outside ±threshold, clip the global norm to max_norm.

    On the device (no synchronisation): every gradient is multiplied by
    min(1, max_norm / (norm + 1e-6)) or by 1. Returns whether it clipped (0-d float).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    weights = [p.grad for p in fusion_weights if p.grad is not None]
    if not grads or not weights:
        return torch.zeros(())
    largest = torch.stack([g.detach().abs().max().float() for g in weights]).max()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))
    exceeds = largest > threshold
    factor = torch.where(exceeds, (max_norm / (norm + 1e-6)).clamp(max=1.0), torch.ones_like(norm))
    torch._foreach_mul_(grads, factor.to(grads[0].device))
    return exceeds.float()


# -- the plugin ----------------------------------------------------------------------------------

@METHODS.register("agm")
class AGM(Plugin):
    """Adaptive gradient modulation through Shapley mono-modal responses (Li et al., ICCV 2023)."""

    class Config(WindowConfig):
        alpha: float = Field(0.1, ge=0, description="α in κ_m = exp(α · min(r̂_m − r_m, cap))")
        cap: Optional[float] = Field(
            None, gt=0, description="upper bound of r̂_m − r_m in κ's exponent; unset: 10 (response_hook) or 7 (encoder_grad)"
        )
        variant: Literal["response_hook", "encoder_grad"] = Field(
            "response_hook",
            description="response_hook (paper, authors' code): the gradient through the fused logits becomes "
            "Σ κ_m ∂φ_m; encoder_grad (BalanceMM): every ≥2-D encoder-m gradient × κ_m after backward",
        )
        zeroing: Literal["feature", "input"] = Field(
            "feature",
            description="coalitions from zeroed features, or from zeroed inputs encoded again in eval mode (authors' code)",
        )
        ratio_factor: Optional[float] = Field(
            None, gt=0,
            description="c in r_m = exp(c (mean_k s_k − s_m)); unset: M/(M−1), so that 2 modalities give r_a = exp(s_v − s_a)",
        )
        score_floor: float = Field(1e-8, gt=0, lt=1, description="floor of the true-class probability inside −log")
        clip: bool = Field(True, description="clip the global gradient norm when a fusion weight gradient is large")
        clip_threshold: Optional[float] = Field(
            None, gt=0, description="clip when an element of a fusion weight gradient exceeds ±this; unset: 1 (5 encoder_grad)"
        )
        clip_norm: Optional[float] = Field(
            None, gt=0, description="global gradient norm clipped to; unset: 1 (5 encoder_grad)"
        )

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options agm`)
    search_space = {
        "alpha": FloatRange(0.01, 1.0, log=True),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        if len(self.modalities) > MANY_MODALITIES:
            warnings.warn(
                f"agm fuses 2^M − 1 = {2 ** len(self.modalities) - 1} coalitions per step with {len(self.modalities)} modalities",
                stacklevel=2,
            )
        cap, threshold, norm = VARIANT_DEFAULTS[config.variant]
        self.cap = config.cap if config.cap is not None else cap
        self.clip_threshold = config.clip_threshold if config.clip_threshold is not None else threshold
        self.clip_norm = config.clip_norm if config.clip_norm is not None else norm
        self.coalitions, matrix = response_matrix(self.modalities)
        self.register_buffer("response_weights", matrix.float(), persistent=False)
        self.register_buffer("score_average", torch.zeros(len(self.modalities)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._model = None  # a weak link to the model, for zeroing=input (set in setup, never state)

    def setup(self, model, ctx):
        self._model = weakref.ref(model)

    # -- coalition outputs ----------------------------------------------------------------------
    def coalition_outputs(self, record, with_grad: bool) -> Tensor:
        """F(S) [K, B, C] for every non-empty coalition, 𝓜 last (the objective's fused logits)."""
        fused = record.logits if record.logits is not None else record.fuse(record.features)
        if self.config.zeroing == "input":
            partial = self._input_coalitions(record, with_grad)
        else:
            partial = self._feature_coalitions(record, with_grad)
        outputs = torch.stack([*partial, fused.to(partial[0].dtype)])
        return outputs if with_grad else outputs.detach()

    def _feature_coalitions(self, record, with_grad: bool) -> list[Tensor]:
        # the singletons are the record's cached fuse(f^{m}), computed with gradient so that a later
        # part reading the cache gets a graph whatever AGM needed
        singles = dict(zip(self.modalities, record.zeroed_logits()))
        outputs = []
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            for coalition in self.coalitions[:-1]:
                if len(coalition) == 1:
                    outputs.append(singles[next(iter(coalition))])
                else:
                    outputs.append(record.fuse(zero_out(record.features, coalition)))
        return outputs

    def _input_coalitions(self, record, with_grad: bool) -> list[Tensor]:
        model = self._model() if self._model is not None else None
        if model is None:
            raise RuntimeError("agm.zeroing=input needs the model: call the method's setup(model, ctx) first")
        if record.features is not record.encoder_outputs:
            raise ConfigError(
                "agm.zeroing=input re-encodes inputs with the model's encoders, but this objective's fusion head "
                "reads other features (use agm.zeroing=feature)"
            )
        inputs = record.batch.inputs
        modes = [(module, module.training) for module in model.encoders.modules()]
        model.encoders.eval()
        try:
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                present = model.encode(inputs, self.modalities)
                absent = model.encode({m: torch.zeros_like(inputs[m]) for m in self.modalities}, self.modalities)
                return [
                    record.fuse({m: present[m] if m in coalition else absent[m] for m in self.modalities})
                    for coalition in self.coalitions[:-1]
                ]
        finally:
            for module, mode in modes:
                module.training = mode

    @staticmethod
    def fused_gradient(record) -> Optional[Tensor]:
        """g = ∂(loss terms so far)/∂z, or None when no term reaches the fused logits."""
        logits = record.logits
        terms = [t for t in record.losses.values() if t.requires_grad]
        if logits is None or not logits.requires_grad or not terms:
            return None
        (grad,) = torch.autograd.grad(torch.stack([t.float() for t in terms]).sum(), logits,
                                      retain_graph=True, allow_unused=True)
        return grad

    # -- hooks ----------------------------------------------------------------------------------
    def on_forward(self, record, ctx):
        window = in_window(self.config, ctx.epoch)
        hooking = window and self.config.variant == "response_hook"
        gradient = self.fused_gradient(record) if hooking else None
        modulating = gradient is not None
        outputs = self.coalition_outputs(record, with_grad=modulating)
        responses = mono_modal_responses(outputs.detach().float(), self.response_weights)
        scores = ctx.dist.mean(response_scores(responses, record.labels, self.config.score_floor))
        stats = modulation_coefficients(scores, self.score_average, self.config.alpha, self.cap, self.config.ratio_factor)
        coefficients = stats["coefficient"]
        if modulating:
            record.add_loss("agm_response", modulation_term(outputs, self.response_weights, coefficients, gradient))
        elif window and self.config.variant == "encoder_grad":
            record.shared[COEFFICIENTS] = coefficients
            modulating = True
        record.shared[SCORES] = scores
        record.logs["agm/modulating"] = float(modulating)
        logged = {"score": scores, "average": self.score_average.clone(), **stats}
        for name, values in logged.items():
            record.logs.update({f"agm/{name}/{m}": v for m, v in zip(self.modalities, values.detach())})

    def after_backward(self, record, ctx):
        if not in_window(self.config, ctx.epoch):
            return
        coefficients = record.shared.get(COEFFICIENTS) if record is not None else None
        if coefficients is not None:
            for m, factor in zip(self.modalities, coefficients):
                grads = [p.grad for p in ctx.params.encoder[m] if p.grad is not None and p.ndim >= 2]
                if grads:
                    torch._foreach_mul_(grads, factor.to(grads[0]))
        if self.config.clip:
            fusion_weights = [p for p in ctx.params.fusion if p.ndim >= 2]
            clipped = clip_when_fusion_gradient_exceeds(fusion_weights, ctx.params.trainable(), self.clip_threshold, self.clip_norm)
            if record is not None:
                record.logs["agm/clipped"] = clipped

    def after_step(self, record, ctx):
        # running statistics keep updating outside the window (BASELINES §1.3)
        if record is None or SCORES not in record.shared:
            return
        self.steps += 1
        self.score_average.copy_(running_average(self.score_average, record.shared[SCORES].to(self.score_average), self.steps))
