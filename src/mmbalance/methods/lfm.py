"""LFM: dynamically learning the modality gap (Yang, Wan, Jiang, Xu, "Facilitating Multimodal
Classification via Dynamically Learning Modality Gap", NeurIPS 2024), as an objective.

Modalities fit the labels at different speeds; an unsupervised cross-modal
alignment loss, mixed with the supervised loss by a weight that changes over
training, evens that out (BASELINES §14c). Per step:

    L = s · ((1 − α) · CE(z, y) + α · L_align)        (s = ``loss_scale``, 2 as in BalanceMM)

L_align is the mean over the M(M−1)/2 modality pairs of

- ``contrastive`` (default): symmetric InfoNCE between the L2-normalised
  features f_a, f_b of the batch, S = f̂_a f̂_bᵀ / τ,
  ½ [CE(S, i ↦ i) + CE(Sᵀ, i ↦ i)], τ = 0.1;
- ``js``: the Jensen–Shannon divergence of softmax(d_a) and softmax(d_b)
  (d_m the fusion-restricted logits of §1.1, or the unimodal heads' with
  ``score_logits=heads``), batch mean;
- ``bmm_js``: what BalanceMM's ``F.kl_div(p.log(), m)`` evaluates,
  ½ [KL(m ‖ p) + KL(m ‖ q)] with m = (p + q) / 2 (not a JS divergence; for
  reproduction only).

α (the alignment weight, α_ce = 1 − α) is learnt once per epoch
(``alpha_update=learning-fitted``) by a first-order hypergradient of the
held-out loss after a virtual SGD step of size η (the current learning rate,
or ``virtual_lr``):
d L_val(θ − η ∇L_train)/dα ≈ −η ⟨∇L_val, ∇L_align − ∇CE_train⟩, so

    α ← clip(α + lr_α · η · ⟨∇_θ L_val, ∇_θ L_align − ∇_θ CE_train⟩, 0.05, 0.95),

θ the encoders' and the fusion head's parameters, ∇L_val the gradient of the
fused CE on the first ``heldout_batches`` batches of ``ctx.heldout_loader``
(the validation split, or a carve of the training split; never the test
split, which is what BalanceMM reads when a dataset has no validation split),
∇L_align and ∇CE_train on the first ``train_batches`` batches of
``ctx.train_eval_loader``. The passes run in eval mode (no dropout, no
BatchNorm statistics updated by held-out data) and leave every ``.grad``
alone. lr_α halves before the update for every epoch t > 0 with
t % 20 == 0, t being the epoch the new α will steer. By default α is updated
at the end of each epoch (for the next one), so the update is in the epoch's
checkpoint and logs; ``update_at=epoch_start`` updates it before the epoch it
steers, as BalanceMM does. ``heuristic`` replaces the learnt α by the fixed
schedule α(t) = clip(exp(−0.3 t), 0.05, 0.95) of a public LFM training script
[unverified]; ``fixed`` keeps ``alpha_init``.

α, lr_α and the update counters are buffers, so a resumed run continues the
same schedule. The unimodal heads are trained as detached probes (LFM does
not train them).
"""

from __future__ import annotations

import math
from itertools import islice
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..models.readouts import restricted_logits
from ..registry import METHODS
from ..search_space import FloatRange
from .base import Objective, cross_entropy

Alignment = Literal["contrastive", "js", "bmm_js"]


# -- the method's core, on plain tensors ------------------------------------------------------------------

def modality_pairs(count: int) -> list[tuple[int, int]]:
    """The M(M−1)/2 index pairs (a, b), a < b, in order."""
    return [(a, b) for a in range(count) for b in range(a + 1, count)]


def info_nce(features_a: Tensor, features_b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE of paired rows: ½ [CE(S, i ↦ i) + CE(Sᵀ, i ↦ i)], S = f̂_a f̂_bᵀ / τ.

    Rows are L2-normalised first, so only directions count; sample i of one
    modality is the positive of sample i of the other, the batch's other
    samples are the negatives.
    """
    a = F.normalize(features_a.flatten(1).float(), dim=-1)
    b = F.normalize(features_b.flatten(1).float(), dim=-1)
    similarity = a @ b.T / temperature
    target = torch.arange(similarity.shape[0], device=similarity.device)
    return 0.5 * (F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target))


def _log_mixture(log_p: Tensor, log_q: Tensor) -> Tensor:
    """log((p + q) / 2), computed in log space."""
    return torch.logaddexp(log_p, log_q) - math.log(2.0)


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Batch mean of JS(softmax(p) ‖ softmax(q)) = ½ [KL(p ‖ m) + KL(q ‖ m)], m = (p + q) / 2.

    Zero exactly when the two predictions agree; at most log 2.
    """
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    log_m = _log_mixture(log_p, log_q)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm).mean()


def bmm_js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Batch mean of ½ [KL(m ‖ p) + KL(m ‖ q)]: what BalanceMM's ``F.kl_div(p.log(), m)`` pair computes.

    ``F.kl_div(input, target)`` is KL(target ‖ exp(input)), so BalanceMM's
    "JS" has the mixture on the wrong side; it is still zero when p = q but
    is unbounded. Kept for reproduction only.
    """
    log_p, log_q = logits_p.float().log_softmax(-1), logits_q.float().log_softmax(-1)
    log_m = _log_mixture(log_p, log_q)
    m = log_m.exp()
    return 0.5 * ((m * (log_m - log_p)).sum(-1) + (m * (log_m - log_q)).sum(-1)).mean()


def alignment_loss(per_modality: list[Tensor], kind: Alignment = "contrastive", temperature: float = 0.1) -> Tensor:
    """L_align: the mean over modality pairs of the pairwise alignment ``kind``.

    ``per_modality``: features (``contrastive``) or logits (``js``,
    ``bmm_js``), one [B, ...] tensor per modality, in the modalities' order.
    """
    if kind == "contrastive":
        pairwise = lambda a, b: info_nce(a, b, temperature)  # noqa: E731
    elif kind == "js":
        pairwise = js_divergence
    elif kind == "bmm_js":
        pairwise = bmm_js_divergence
    else:
        raise ValueError(f"alignment must be contrastive, js or bmm_js, got '{kind}'")
    pairs = modality_pairs(len(per_modality))
    if not pairs:
        raise ValueError("the alignment loss needs at least two modalities")
    return torch.stack([pairwise(per_modality[a], per_modality[b]) for a, b in pairs]).mean()


def hypergradient(grad_val: Tensor, grad_align: Tensor, grad_ce: Tensor) -> Tensor:
    """⟨∇L_val, ∇L_align − ∇CE_train⟩ (float64): minus d L_val(θ − η ∇L_train)/dα, divided by η.

    The three arguments are flattened gradients over the same parameters.
    Positive when the alignment gradient helps the held-out loss more than
    the training CE's does, so α should grow.
    """
    return grad_val.double().dot(grad_align.double() - grad_ce.double())


def alpha_step(alpha: float | Tensor, hypergrad: float | Tensor, lr_alpha: float | Tensor, lr: float,
               low: float = 0.05, high: float = 0.95) -> Tensor:
    """α ← clip(α + lr_α · η · hypergradient, low, high): one gradient-descent step on α, in float64."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    step = torch.as_tensor(lr_alpha, dtype=torch.float64) * lr * torch.as_tensor(hypergrad, dtype=torch.float64)
    return (alpha + step.to(alpha.device)).clamp(low, high)


def lr_alpha_halves(target_epoch: int, every: int) -> bool:
    """Whether lr_α halves before the update for ``target_epoch`` (the epoch the new α steers): t > 0, t % R == 0."""
    return every > 0 and target_epoch > 0 and target_epoch % every == 0


def heuristic_alpha(epoch: int, rate: float = 0.3, low: float = 0.05, high: float = 0.95) -> float:
    """α(t) = clip(exp(−rate · t), low, high): mostly alignment first, mostly classification later [unverified]."""
    return min(high, max(low, math.exp(-rate * epoch)))


def flat_gradient(grads: tuple[Optional[Tensor], ...], params: list[nn.Parameter]) -> Tensor:
    """One float32 vector of ``grads``; a parameter the loss does not reach counts as zeros."""
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)
    ])


# -- the objective ------------------------------------------------------------------------------------------

@METHODS.register("lfm")
class LFM(Objective):
    """LFM: fused CE and cross-modal alignment mixed by a weight learnt on held-out data (Yang et al., NeurIPS 2024).

    Per step: M(M−1)/2 B×B similarities (contrastive) or the M restricted-logit fusion passes (js).
    Per epoch (learning-fitted): one forward + backward on the held-out batch and one forward + two
    backwards on a training batch, in eval mode.
    """

    honours_keep = True

    class Config(Section):
        alignment: Alignment = Field(
            "contrastive",
            description="L_align per modality pair: contrastive (symmetric InfoNCE of L2-normalised features, "
            "the paper's intent, exact form unverified), js (Jensen-Shannon of the unimodal predictions, BMM's "
            "intent) or bmm_js (BMM's computed ½[KL(m‖p)+KL(m‖q)], reproduction only)",
        )
        temperature: float = Field(
            0.1, gt=0, le=10, description="τ of the contrastive alignment [unverified; 0.07 in a public LFM script]"
        )
        score_logits: Literal["fusion", "heads"] = Field(
            "fusion",
            description="unimodal predictions of the js alignments: fusion-restricted logits d_m (BASELINES §1.1) or "
            "the unimodal heads (then also trained by the alignment)",
        )
        alpha_update: Literal["learning-fitted", "heuristic", "fixed"] = Field(
            "learning-fitted",
            description="learning-fitted: α learnt once per epoch by the held-out hypergradient; heuristic: "
            "α(t) = clip(exp(-heuristic_rate·t), alpha_min, alpha_max) [unverified]; fixed: alpha_init throughout",
        )
        alpha_init: float = Field(0.05, ge=0, le=1, description="initial alignment weight α (α_ce = 1 − α)")
        alpha_min: float = Field(0.05, ge=0, le=1, description="lower bound of α")
        alpha_max: float = Field(0.95, ge=0, le=1, description="upper bound of α")
        lr_alpha: float = Field(
            1e-4, ge=0, le=1e6, description="lr_α, step size of α's update (multiplied by the virtual step's η)"
        )
        lr_alpha_halving: int = Field(
            20, ge=0, description="lr_α halves before the update for every epoch t > 0 with t % this == 0; 0: never"
        )
        virtual_lr: Optional[float] = Field(
            None, gt=0, le=1e6,
            description="η of the virtual step in α's update; unset: the run's current learning rate (spec); "
            "1: α moves by lr_α · hypergradient, BMM's scale",
        )
        update_at: Literal["epoch_end", "epoch_start"] = Field(
            "epoch_end",
            description="when α is learnt: at the end of each epoch, for the next one (logged and checkpointed with "
            "it), or at the start of the epoch it steers (BMM, spec §14c)",
        )
        update_data: Literal["train", "heldout"] = Field(
            "train",
            description="where ∇L_align and ∇CE_train come from: training batches (ctx.train_eval_loader, spec) or the "
            "held-out batches that also give ∇L_val (BMM)",
        )
        heldout_batches: int = Field(
            1, ge=1, le=100_000, description="held-out batches (the loader's fixed order, from its start) behind ∇L_val"
        )
        train_batches: int = Field(
            1, ge=1, le=100_000, description="training batches (fixed order, from the start) behind ∇L_align and ∇CE_train"
        )
        heuristic_rate: float = Field(0.3, gt=0, le=100, description="rate a of the heuristic α(t) = exp(−a·t)")
        loss_scale: float = Field(2.0, gt=0, le=100, description="s in L = s·((1−α)·CE + α·L_align) (BMM's 2)")

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options lfm`)
    search_space = {
        "temperature": FloatRange(0.05, 1.0, log=True),
        "alpha_init": FloatRange(0.05, 0.5),
        "lr_alpha": FloatRange(1e-5, 1e-2, log=True),
    }

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        c = config
        if not c.alpha_min <= c.alpha_max:
            raise ConfigError(
                f"lfm.alpha_min ({c.alpha_min}) is above lfm.alpha_max ({c.alpha_max}); choose alpha_min <= alpha_max"
            )
        if not c.alpha_min <= c.alpha_init <= c.alpha_max:
            raise ConfigError(
                f"lfm.alpha_init={c.alpha_init} lies outside [alpha_min, alpha_max] = [{c.alpha_min}, {c.alpha_max}]"
            )
        self.register_buffer("alpha", torch.tensor(c.alpha_init, dtype=torch.float64))
        self.register_buffer("lr_alpha", torch.tensor(c.lr_alpha, dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("halvings", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_hypergradient", torch.zeros((), dtype=torch.float64))

    def setup(self, model, ctx):
        if self.config.alignment == "contrastive":
            dims = model.feature_dims
            if len(set(dims.values())) > 1:
                shown = ", ".join(f"{m}: {d}" for m, d in dims.items())
                raise ConfigError(
                    f"lfm.alignment=contrastive compares features of equal size, the encoders give {shown}; "
                    "use one model.feature_dim or lfm.alignment=js"
                )

    # -- α ----------------------------------------------------------------------------------------------------
    def alpha_for(self, epoch: int) -> Tensor:
        """α used in the training steps of ``epoch`` (float64 scalar on the buffers' device)."""
        c = self.config
        if c.alpha_update == "heuristic":
            return torch.tensor(heuristic_alpha(epoch, c.heuristic_rate, c.alpha_min, c.alpha_max),
                                dtype=torch.float64, device=self.alpha.device)
        return self.alpha

    def unimodal_predictions(self, model, features: dict[str, Tensor], restricted: Optional[Tensor]) -> list[Tensor]:
        if self.config.score_logits == "heads":
            heads = self.heads(model, features)
            return [heads[m] for m in self.modalities]
        return list(restricted.unbind(0))

    def alignment_of(self, model, features: dict[str, Tensor], restricted=None) -> Tensor:
        """L_align of a batch's features; ``restricted``: a callable giving the [M, B, C] d_m (js only)."""
        c = self.config
        if c.alignment == "contrastive":
            inputs = [features[m] for m in self.modalities]
        else:
            inputs = self.unimodal_predictions(model, features, restricted() if c.score_logits == "fusion" else None)
        return alignment_loss(inputs, c.alignment, c.temperature)

    # -- one step ---------------------------------------------------------------------------------------------
    def training_step(self, model, batch, ctx):
        features = self.encode_batch(model, batch)
        logits = self.fuse(model, features)
        probe, unimodal = self.probe_loss(model, features, batch.labels)
        record = self.record(model, batch, features, logits=logits, unimodal=unimodal)
        alpha = self.alpha_for(ctx.epoch).float()
        ce = cross_entropy(logits, batch)
        align = self.alignment_of(model, features, record.restricted_logits)
        scale = self.config.loss_scale
        record.add_loss("fused", scale * (1 - alpha) * ce)
        record.add_loss("alignment", scale * alpha * align)
        record.add_loss("probe", probe)
        record.logs["lfm/alpha"] = alpha.detach()
        record.logs["lfm/ce"] = ce.detach()
        record.logs["lfm/alignment"] = align.detach()
        return record

    # -- α's update -------------------------------------------------------------------------------------------
    def trained_parameters(self, ctx) -> list[nn.Parameter]:
        """θ of the hypergradient: the encoders' and the fusion head's trainable parameters."""
        groups = [*(ctx.params.encoder[m] for m in self.modalities), ctx.params.fusion]
        seen, out = set(), []
        for p in (p for group in groups for p in group):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def estimate_gradients(self, model, ctx) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """(∇L_val, ∇L_align, ∇CE_train), each averaged over its batches and over processes; None without data.

        Eval mode, gradients by ``torch.autograd.grad`` (no ``.grad`` is
        touched); the model's train/eval modes are restored.
        """
        c = self.config
        params = self.trained_parameters(ctx)
        if not params:
            return None
        fuse = lambda f: self.fuse(model, f)  # noqa: E731
        size = sum(p.numel() for p in params)
        sums = torch.zeros(3, size, device=ctx.device)  # val, align, ce
        counts = torch.zeros(2, device=ctx.device)  # held-out batches, training batches

        def batch_gradients(batch, need_val: bool, need_train: bool) -> None:
            batch = batch.to(ctx.device)
            features = self.encode(model, batch.inputs)
            ce = F.cross_entropy(self.fuse(model, features), batch.labels)
            if need_train:
                align = self.alignment_of(model, features, lambda: restricted_logits(fuse, features, self.modalities))
                grad_align = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)
                sums[1] += flat_gradient(grad_align, params)
            grad_ce = flat_gradient(torch.autograd.grad(ce, params, allow_unused=True), params)
            if need_val:
                sums[0] += grad_ce
                counts[0] += 1
            if need_train:
                sums[2] += grad_ce
                counts[1] += 1

        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.enable_grad():
                on_heldout = c.update_data == "heldout"
                for batch in islice(ctx.heldout_loader, c.heldout_batches):
                    batch_gradients(batch, need_val=True, need_train=on_heldout)
                if not on_heldout:
                    for batch in islice(ctx.train_eval_loader, c.train_batches):
                        batch_gradients(batch, need_val=False, need_train=True)
        finally:
            for module, mode in modes:
                module.train(mode)
        totals = ctx.dist.all_reduce_sum(torch.cat([sums.reshape(-1), counts]))
        counts = totals[-2:].tolist()
        if min(counts) == 0:
            return None
        sums = totals[:-2].view(3, size)
        return sums[0] / counts[0], sums[1] / counts[1], sums[2] / counts[1]

    def update_alpha(self, model, ctx, target_epoch: int) -> None:
        """Learn α for ``target_epoch``: halve lr_α when due, then one clipped hypergradient step."""
        if lr_alpha_halves(target_epoch, self.config.lr_alpha_halving):
            self.lr_alpha.mul_(0.5)
            self.halvings += 1
        gradients = self.estimate_gradients(model, ctx)
        if gradients is None:  # an empty held-out or training set: α stays
            return
        h = hypergradient(*gradients)
        c = self.config
        lr = c.virtual_lr if c.virtual_lr is not None else float(ctx.optimizer.param_groups[0]["lr"])
        self.alpha.copy_(alpha_step(self.alpha, h, self.lr_alpha, lr, c.alpha_min, c.alpha_max))
        self.last_hypergradient.copy_(h)
        self.updates += 1

    def on_epoch_start(self, model, ctx):
        if self.config.alpha_update == "learning-fitted" and self.config.update_at == "epoch_start":
            self.update_alpha(model, ctx, ctx.epoch)

    def on_epoch_end(self, model, ctx):
        c = self.config
        if c.alpha_update == "learning-fitted" and c.update_at == "epoch_end":
            self.update_alpha(model, ctx, ctx.epoch + 1)
        learnt = c.alpha_update == "learning-fitted"
        logs = {}
        if not (learnt and c.update_at == "epoch_start"):  # there the next α is learnt when the next epoch starts
            logs["lfm/next_alpha"] = float(self.alpha_for(ctx.epoch + 1))
        if learnt:
            logs.update({
                "lfm/hypergradient": float(self.last_hypergradient),
                "lfm/lr_alpha": float(self.lr_alpha),
                "lfm/updates": float(self.updates),
            })
        return logs
