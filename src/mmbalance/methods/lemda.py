"""LeMDA: learning multimodal data augmentation in feature space (Liu, Tang, Shi, Zhang, Li, Shrivastava,
Wilson, "Learning Multimodal Data Augmentation in Feature Space", ICLR 2023), as an objective.

Hand-written augmentations rarely keep an image, its caption and its table
row consistent with each other; LeMDA instead learns one augmentation of
all modalities at once, in feature space (BASELINES §15d). An augmentation
network G reads the concatenated features x = [f_1, …, f_M] (detached: G
never trains the encoders) and returns augmented features of the same
shape, f̂ = G(x), split back per modality. Two networks learn, each with
its own optimizer (``configure_optimizers``: ``task`` and ``augmenter``):

- the task model, on the original and the augmented tuple:
      L_task = CE(fuse(f), y) + CE(fuse(f̂), y)
  (f̂ detached here: only the fusion head learns from the augmented tuple,
  the encoders from the original one);
- G, to make the augmentation hard for the task model while keeping the
  prediction of confident samples:
      L_G = −λ_adv · CE(fuse(f̂), y) + λ_con · L_con + λ_KL · KL_VAE + λ_L2 · ‖f̂ − x‖²/(B·D)
      L_con = (1/B) Σ_i 1[max_c p(fuse(f))_ic > τ] · KL(p(fuse(f))_i ‖ p(fuse(f̂))_i)
      KL_VAE = −½ · (1/(B·K)) Σ (1 + log σ² − μ² − σ²)
  where only G's parameters receive this gradient: the terms that go
  through the fusion head are differentiated with respect to f̂ alone and
  pulled back through G, so the task model's gradients are never touched.

G (``augmenter=vae``, the paper's and the code's choice): an MLP encoder
x → (μ, log σ²) ∈ ℝ^K, z = μ + σ ⊙ ε (ε ~ N(0, I) from ``ctx.generator``),
an MLP decoder z → δ ∈ ℝ^D and f̂ = x + δ; the decoder's last layer starts
at zero, so G starts as the identity. ``augmenter=mlp``: f̂ = x + MLP(x),
no noise and no KL term.

``schedule=alternating`` (default, Algorithm 1 read as "task step, then G
step"): the trainer steps the task model on L_task, then (``after_step``)
G steps on L_G through the *updated* fusion head. ``schedule=simultaneous``
(the authors' code, one backward for both): G steps first, inside the
training step, on the fusion head as it was, and the task step uses the
f̂ drawn before G moved — both gradients are taken at the same parameters.
G steps through ``ctx.manual_step(loss, None, optimizer)`` (averaging,
clipping; every part's ``after_backward`` sees ``record=None``, i.e. not a
task step); ``augmenter_every=k`` steps G on every k-th global step only.

LeMDA is not a ``manual_optimization`` objective: the task step is the
trainer's own, so plugins that act on the forward pass (``lemda+arl``,
``lemda+ogm_ge``) act on the task step, as with ``joint``. The trainer
also steps the ``augmenter`` optimizer after the task backward; G has no
gradient then (the task loss reads f̂ detached), so that step moves nothing.
In the alternating schedule the task step's gradients are still on the
parameters when G steps; they are set aside for G's step (so they count in
neither its averaging nor its clipping) and put back after it. The run's
``train.scheduler`` applies to both optimizers.

``variant=official`` is the released code (lzcemma/LeMDA, AutoGluon's
``fusion.py``/``lit_module.py``): one backward for both networks
(``schedule`` unset → simultaneous), the task loss is the mean CE over the
2B original and augmented rows, i.e. ½ CE(fuse(f)) + ½ CE(fuse(f̂)) (so the
adversarial term is −λ_adv · ½ CE(fuse(f̂))), the consistency term is
KL(p(fuse(f̂)) ‖ p(fuse(f))) (augmented first; mask still on the original's
confidence) and it also trains the fusion head (a task-loss term
``consistency_head``), and an L2 term λ_L2 = 0.1 pulls f̂ towards x. Not
reproduced: the released MLP-VAE ends its decoder with a ReLU after the
zero-initialised layer, whose gradient at 0 is 0, so as released its
perturbation stays exactly 0 (f̂ = x); here the last layer is linear.

Prediction and evaluation read the original features only (``fuse(f)``): G
is a training-time augmentation. The unimodal heads are trained as detached
probes (``probe``), as in ``joint``.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..registry import METHODS
from ..search_space import Choice, FloatRange
from .base import Objective, cross_entropy

#: the two optimizers, in the trainer's order (``ctx.optimizer`` is the task's)
TASK, AUGMENTER = "task", "augmenter"
#: record.shared keys: what the G step needs from the training step
INPUT, NOISE, AUGMENTED = "lemda/input", "lemda/noise", "lemda/augmented"
MEAN, LOG_VARIANCE = "lemda/mu", "lemda/logvar"


# -- the rules, on plain tensors ---------------------------------------------------------------------
def concat_features(features: dict[str, Tensor], modalities: list[str]) -> Tensor:
    """x = [f_1, …, f_M] ∈ ℝ^{B×D}, in modality order (each f_m flattened past the batch dimension)."""
    return torch.cat([features[m].flatten(1) for m in modalities], dim=1)


def split_features(x: Tensor, like: dict[str, Tensor], modalities: list[str]) -> dict[str, Tensor]:
    """The inverse of ``concat_features``: x cut back into tensors shaped as ``like``'s."""
    widths = [like[m][0].numel() for m in modalities]
    return {m: part.reshape(like[m].shape) for m, part in zip(modalities, x.split(widths, dim=1))}


def reparameterize(mean: Tensor, log_variance: Tensor, noise: Tensor) -> Tensor:
    """z = μ + exp(½ log σ²) ⊙ ε, with ε drawn by the caller (so the draw is the run's generator's)."""
    return mean + torch.exp(0.5 * log_variance) * noise.to(mean.dtype)


def gaussian_kl(mean: Tensor, log_variance: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)), averaged over the batch and the latent dimensions (the code's normalisation).

    −½ · mean(1 + log σ² − μ² − σ²). E.g. μ = [[1, 0]], log σ² = [[0, ln 2]]:
    −½ · ((1 + 0 − 1 − 1) + (1 + ln 2 − 0 − 2)) / 2 = 0.32671.
    """
    return -0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp()).mean()


def confidence_mask(original_logits: Tensor, threshold: float) -> Tensor:
    """1 where the original prediction is confident, max_c p_c > τ (strictly), else 0; float [B]."""
    return (original_logits.detach().softmax(-1).amax(-1) > threshold).float()


def consistency_loss(
    original_logits: Tensor,
    augmented_logits: Tensor,
    threshold: float,
    direction: Literal["original", "augmented"] = "original",
) -> tuple[Tensor, Tensor]:
    """(L_con, mask): the per-sample KL between the two predictions on confident samples, averaged over the batch.

    ``original``: KL(p(z) ‖ p(ẑ)) (the spec's); ``augmented``: KL(p(ẑ) ‖ p(z))
    (the authors' code). The original prediction is a fixed target (no
    gradient); masked samples count as 0 in the mean over all B samples.
    """
    mask = confidence_mask(original_logits, threshold)
    log_p = original_logits.detach().float().log_softmax(-1)
    log_q = augmented_logits.float().log_softmax(-1)
    if direction == "original":
        per_sample = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        per_sample = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (per_sample * mask).mean(), mask


# -- the augmentation networks ------------------------------------------------------------------------
def _units(widths: list[int]) -> nn.Sequential:
    """LayerNorm → Linear → ReLU per consecutive pair of widths (the code's unit, without its dropout)."""
    return nn.Sequential(*[
        nn.Sequential(nn.LayerNorm(a), nn.Linear(a, b), nn.ReLU()) for a, b in zip(widths[:-1], widths[1:])
    ])


def _zero_linear(width_in: int, width_out: int) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class VAEAugmenter(nn.Module):
    """f̂ = x + dec(μ + σ ⊙ ε), (μ, log σ²) = enc(x); the last decoder layer starts at zero (G = identity)."""

    def __init__(self, width: int, hidden: int, latent: int, layers: int):
        super().__init__()
        self.latent_dim = latent
        self.encoder = _units([width] + [hidden] * layers)
        self.mean = nn.Linear(hidden, latent)
        self.log_variance = nn.Linear(hidden, latent)
        self.decoder = _units([latent] + [hidden] * layers)
        self.out = _zero_linear(hidden, width)

    def forward(self, x: Tensor, noise: Optional[Tensor]):
        hidden = self.encoder(x)
        mean, log_variance = self.mean(hidden), self.log_variance(hidden)
        return x + self.out(self.decoder(reparameterize(mean, log_variance, noise))), mean, log_variance


class MLPAugmenter(nn.Module):
    """f̂ = x + MLP(x), deterministic; the last layer starts at zero (G = identity)."""

    latent_dim = 0

    def __init__(self, width: int, hidden: int, layers: int):
        super().__init__()
        self.body = _units([width] + [hidden] * layers)
        self.out = _zero_linear(hidden, width)

    def forward(self, x: Tensor, noise: Optional[Tensor] = None):
        return x + self.out(self.body(x)), None, None


# -- the objective ----------------------------------------------------------------------------------
@METHODS.register("lemda")
class LeMDA(Objective):
    """Learned feature-space augmentation: a VAE on the concatenated features, adversarial with a consistency regulariser (Liu et al., ICLR 2023)."""

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options lemda`)
    search_space = {
        "adversarial_weight": FloatRange(1e-4, 1.0, log=True),
        "consistency_weight": FloatRange(1e-3, 1.0, log=True),
        "confidence_threshold": FloatRange(0.3, 0.95),
        "kl_weight": FloatRange(1e-3, 1.0, log=True),
        "augmenter": Choice(["vae", "mlp"]),
    }

    class Config(Section):
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="paper: L_task = CE + CE_aug, KL(p ‖ p_aug) trains G only, task step then G step; official "
            "(the released code): one backward for both, task loss = mean CE over the 2B rows (½ each), "
            "KL(p_aug ‖ p) that also trains the fusion head, L2 term 0.1",
        )
        schedule: Optional[Literal["alternating", "simultaneous"]] = Field(
            None,
            description="alternating: task step, then G step on the updated head; simultaneous: both gradients "
            "at the same parameters (G steps first) (unset: alternating for paper, simultaneous for official) "
            "[unverified]",
        )
        augmenter: Literal["vae", "mlp"] = Field(
            "vae",
            description="G: a VAE with a residual output (the paper's and the code's), or a deterministic residual MLP",
        )
        hidden_dim: Optional[int] = Field(
            None, ge=1, le=65536, description="width of G's hidden layers (unset: D, the concatenated feature width)"
        )
        num_layers: int = Field(2, ge=1, le=16, description="hidden layers of G's encoder and of its decoder")
        latent_dim: int = Field(8, ge=1, le=4096, description="K, the VAE's latent size (the code's z_dim = 8)")
        adversarial_weight: float = Field(
            1e-4, ge=0, le=1e6,
            description="λ_adv: G maximises λ_adv · CE(fuse(f̂)) (the code's adv_weight) [unverified]",
        )
        consistency_weight: float = Field(
            0.01, ge=0, le=1e6,
            description="λ_con, weight of the confident-sample consistency KL in G's loss (the code's) [unverified]",
        )
        confidence_threshold: float = Field(
            0.5, ge=0, le=1,
            description="τ: the consistency term counts samples whose original max probability is > τ [unverified]",
        )
        kl_weight: float = Field(0.1, ge=0, le=1e6, description="λ_KL, weight of the VAE's KL to N(0, I) [unverified]")
        l2_weight: Optional[float] = Field(
            None, ge=0, le=1e6,
            description="λ_L2, weight of mean (f̂ − x)² in G's loss (unset: 0 for paper, 0.1 for official)",
        )
        augmenter_every: int = Field(
            1, ge=1, le=1_000_000, description="step G on every k-th global step only (1: every step)"
        )
        augmenter_optimizer: Literal["adam", "run"] = Field(
            "adam",
            description="G's optimizer: Adam with augmenter_lr and augmenter_weight_decay (the code's), or the run's "
            "train.optimizer settings",
        )
        augmenter_lr: float = Field(1e-4, gt=0, le=10, description="G's Adam learning rate (augmenter_optimizer=adam)")
        augmenter_weight_decay: float = Field(
            1e-5, ge=0, le=1, description="G's Adam weight decay (augmenter_optimizer=adam)"
        )

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        official = config.variant == "official"
        self.schedule = config.schedule or ("simultaneous" if official else "alternating")
        self.l2_weight = config.l2_weight if config.l2_weight is not None else (0.1 if official else 0.0)
        #: weight of each task-loss CE: the code's mean over 2B rows halves both
        self.task_scale = 0.5 if official else 1.0
        self.direction: Literal["original", "augmented"] = "augmented" if official else "original"
        self.consistency_trains_fusion = official
        self.augmenter: Optional[nn.Module] = None

    def setup(self, model, ctx):
        if self.augmenter is not None:
            return
        width = sum(model.feature_dims[m] for m in self.modalities)
        hidden = self.config.hidden_dim or width
        if self.config.augmenter == "vae":
            self.augmenter = VAEAugmenter(width, hidden, self.config.latent_dim, self.config.num_layers)
        else:
            self.augmenter = MLPAugmenter(width, hidden, self.config.num_layers)

    def configure_optimizers(self, model, ctx):
        """``task``: every trainable parameter but G's, with the run's settings; ``augmenter``: G's alone."""
        own = {id(p) for p in self.augmenter.parameters()}
        task = ctx.make_optimizer([p for p in ctx.params.trainable() if id(p) not in own])
        params = [p for p in self.augmenter.parameters() if p.requires_grad]
        if self.config.augmenter_optimizer == "adam":
            augmenter = torch.optim.Adam(
                params, lr=self.config.augmenter_lr, weight_decay=self.config.augmenter_weight_decay
            )
        else:
            augmenter = ctx.make_optimizer(params)
        return {"optimizers": {TASK: task, AUGMENTER: augmenter}}

    # -- one step ------------------------------------------------------------------------------------
    def draw_noise(self, batch_size: int, ctx, like: Tensor) -> Optional[Tensor]:
        """ε ~ N(0, I) [B, K] from ``ctx.generator`` (on its device, then moved); None for the MLP augmenter."""
        latent = self.augmenter.latent_dim
        if latent == 0:
            return None
        noise = torch.randn((batch_size, latent), generator=ctx.generator, device=ctx.generator.device)
        return noise.to(device=like.device, dtype=like.dtype)

    def augmenter_updates(self, ctx) -> bool:
        return ctx.global_step % self.config.augmenter_every == 0

    def training_step(self, model, batch, ctx):
        config = self.config
        features = self.encode(model, batch.inputs)
        x = concat_features(features, self.modalities).detach()
        noise = self.draw_noise(x.shape[0], ctx, x)
        augmented, mean, log_variance = self.augmenter(x, noise)
        shared = {INPUT: x, NOISE: noise, AUGMENTED: augmented, MEAN: mean, LOG_VARIANCE: log_variance}
        logs: dict = {}
        stepping = self.augmenter_updates(ctx)
        if stepping and self.schedule == "simultaneous":
            # on the task model as it is now
            logs = self.augmenter_step(lambda f: self.fuse(model, f), features, batch, shared, ctx)

        logits = self.fuse(model, features)
        augmented_features = split_features(augmented.detach(), features, self.modalities)
        augmented_logits = self.fuse(model, augmented_features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", self.task_scale * cross_entropy(logits, batch))
        record.add_loss("augmented", self.task_scale * cross_entropy(augmented_logits, batch))
        if self.consistency_trains_fusion and config.consistency_weight > 0:
            consistency, _ = consistency_loss(logits, augmented_logits, config.confidence_threshold, self.direction)
            record.add_loss("consistency_head", config.consistency_weight * consistency)
        probe, record.unimodal = self.probe_loss(model, features, batch.labels)
        record.add_loss("probe", probe)
        if stepping and self.schedule == "alternating":
            record.shared.update(shared)  # G steps in after_step, once the task model has
        record.logs.update(logs)
        correct = augmented_logits.detach().argmax(-1) == batch.labels
        record.logs["lemda/augmented_accuracy"] = correct.float().mean()
        shift = augmented.detach() - x
        for m, part in split_features(shift, features, self.modalities).items():
            size = features[m].detach().flatten(1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
            record.logs[f"lemda/shift/{m}"] = (part.flatten(1).norm(dim=1) / size).mean()
        return record

    def after_step(self, record, ctx):
        if INPUT in record.shared:
            # record.fuse reads the task model as the trainer's step left it
            record.logs.update(self.augmenter_step(record.fuse, record.features, record.batch, record.shared, ctx))

    def augmenter_step(self, fuse, like: dict[str, Tensor], batch, shared: dict, ctx) -> dict:
        """One step of G on L_G (module docstring), reading the task model through ``fuse``; returns its logs.

        ``like`` gives the features' shapes (to split f̂ per modality).
        """
        config = self.config
        x, augmented = shared[INPUT], shared[AUGMENTED]
        with torch.no_grad():
            original_logits = fuse(split_features(x, like, self.modalities))
        augmented_logits = fuse(split_features(augmented, like, self.modalities))
        augmented_ce = self.task_scale * cross_entropy(augmented_logits, batch)
        consistency, mask = consistency_loss(
            original_logits, augmented_logits, config.confidence_threshold, self.direction
        )
        through_head = -config.adversarial_weight * augmented_ce + config.consistency_weight * consistency
        # only G learns from L_G: the head's part is differentiated w.r.t. f̂ alone, then pulled back through G
        (gradient,) = torch.autograd.grad(through_head, augmented)
        loss = (augmented * gradient).sum()
        vae_kl = gaussian_kl(shared[MEAN], shared[LOG_VARIANCE]) if shared[MEAN] is not None else x.new_zeros(())
        l2 = F.mse_loss(augmented, x)
        if config.kl_weight > 0 and shared[MEAN] is not None:
            loss = loss + config.kl_weight * vae_kl
        if self.l2_weight > 0:
            loss = loss + self.l2_weight * l2
        # the task step's gradients (alternating: still on the parameters) stay out of G's averaging and clipping,
        # and are put back afterwards, so the parts' after_step hooks find the task step as it was
        left = [p for p in ctx.params.all() if p.grad is not None]
        kept = [p.grad for p in left]
        for p in left:
            p.grad = None
        ctx.manual_step(loss, None, ctx.optimizers[AUGMENTER])
        for p, grad in zip(left, kept):
            p.grad = grad
        value = through_head.detach() + config.kl_weight * vae_kl.detach() + self.l2_weight * l2.detach()
        return {
            "lemda/augmenter_loss": value,
            "lemda/augmented_ce": augmented_ce.detach(),
            "lemda/consistency": consistency.detach(),
            "lemda/confident": mask.mean(),
            "lemda/vae_kl": vae_kl.detach(),
            "lemda/l2": l2.detach(),
        }
