"""Greedy: balanced multimodal learning against greedy learning (Wu, Jastrzębski, Cho, Geras,
"Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural Networks",
ICML 2022), as an objective for two modalities.

The two encoders exchange information through MMTM blocks (``models/mmtm.py``)
placed after chosen stages (``Encoder.staged()``): the encoders run in
lock-step, stage k of both, then MMTM k. How fast each modality learns
through its cross-modal *bypass* (the MMTM parameters that gate it) against
its own *main* parameters (its encoder) shows which one leans on the other;
when that is unbalanced, a few *curation* steps cut one modality off from
the other's sample-specific signal, so it must learn alone (BASELINES §11).

Per step:

1. Forward in lock-step; in curation with caring modality c, c's gate in
   every block is replaced by ḡ_c, the cumulative mean of its batch-mean
   gate (the same for every sample, no gradient). Every training forward
   first adds its batch-mean gates to ḡ (averaged over processes).
2. Loss CE(z, y) on the fused logits (plus the unimodal heads: probes, or
   trained with ``unimodal_weight``); backward.
3. ``after_backward``, when the step was not a curation step: with
   s(P) = ‖∇P‖² / ‖P‖² over a parameter group,
   μ^main_m += s(encoder m), μ^byp_m += s(W_m of every block + every W_s),
   BDR_m = log10(μ^byp_m / μ^main_m), d = BDR_0 − BDR_1.
4. From ``start_epoch`` on: a step outside curation with |d| > ε starts
   curation for the next Q = ``curation_steps`` steps with c = 0 if d > 0
   else 1 (modality 0 learns faster through its bypass: it is cut off);
   a curation step only counts, and the Q-th ends it.

Evaluation and ``encode`` run the blocks with the sample-specific gates
(never in curation) and leave ḡ alone. Every decision is made with tensor
operations on buffers, so a step never waits for the device.

``variant=official`` is the authors' code where it differs: the running
mean of modality 1 is fed modality 0's gate (needs equal widths at every
block), and ``start_epoch`` (unset) is 1, since the code's
``starting_epoch=2`` counts epochs from 1.
"""

from __future__ import annotations

from typing import Annotated, Iterable, Literal, Optional

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import Section
from ..errors import ConfigError
from ..models.mmtm import MMTM
from ..registry import METHODS
from ..search_space import FloatRange, IntRange
from .base import Objective, cross_entropy

#: record.shared key: per block, the gates [g_0, g_1] the step's forward used
GATES = "greedy/gates"
STAGED_ENCODERS = "mlp, cnn, resnet18"


# -- the rule, on plain tensors ------------------------------------------------------------------------
def learning_speed(parameters: Iterable[nn.Parameter]) -> Tensor:
    """s(P) = ‖∇P‖² / ‖P‖² over a group (a parameter without a gradient counts as a zero gradient)."""
    parameters = list(parameters)
    weights = torch.stack([p.detach().float().square().sum() for p in parameters]).sum()
    grads = [p.grad.detach().float().square().sum() for p in parameters if p.grad is not None]
    gradient = torch.stack(grads).sum() if grads else torch.zeros_like(weights)
    return gradient / weights.clamp_min(torch.finfo(weights.dtype).tiny)


def bypass_dominance(mu_bypass: Tensor, mu_main: Tensor) -> Tensor:
    """BDR_m = log10(μ^byp_m / μ^main_m): how much faster m learns through the other modality than alone.

    Both sums are floored at the smallest positive number, so a modality
    that has not moved yet gives a finite value (0 when neither has moved).
    """
    tiny = torch.finfo(mu_bypass.dtype).tiny
    return torch.log10(mu_bypass.clamp_min(tiny) / mu_main.clamp_min(tiny))


def curation_transition(
    curation: Tensor, counter: Tensor, caring: Tensor, d: Tensor, epsilon: float, steps: int, unlocked: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(curation, counter, caring) after a step, as the official ``on_backward_end`` moves them.

    In curation: counter + 1, and curation ends when it reaches ``steps``.
    Otherwise, when ``unlocked`` and |d| > ε: curation starts (counter 0) with
    caring modality 0 if d > 0 else 1; else it stays off with caring 0.
    E.g. d = 1, ε = 0.01, steps = 5: the next 5 steps are curation steps with c = 0.
    """
    counted = counter + 1
    enter = ~curation & (d.abs() > epsilon) & unlocked
    stays = curation & (counted < steps)
    chosen = (d <= 0).to(caring.dtype)
    new_caring = torch.where(curation, caring, torch.where(enter, chosen, torch.zeros_like(caring)))
    new_counter = torch.where(curation, counted, torch.zeros_like(counter))
    return stays | enter, new_counter, new_caring


@METHODS.register("greedy")
class Greedy(Objective):
    """MMTM blocks between two encoders; curation steps steered by the bypass/main learning speeds (Wu et al., ICML 2022)."""

    #: the ranges `mmbalance tune` samples (shown by `mmbalance list options greedy`)
    search_space = {
        "epsilon": FloatRange(1e-3, 0.1, log=True),
        "curation_steps": IntRange(1, 20),
        "ratio": FloatRange(2.0, 16.0, log=True),
    }

    class Config(Section):
        epsilon: float = Field(0.01, ge=0, description="ε: curation starts when |BDR_0 − BDR_1| > ε (BMM uses 0.001)")
        curation_steps: int = Field(5, ge=1, description="Q: how many steps one curation lasts")
        start_epoch: Optional[int] = Field(
            None, ge=0,
            description="first epoch (0-based) that may start a curation; unset: 2 (variant=official: 1, the code's "
            "starting_epoch=2 counted from 1)",
        )
        ratio: float = Field(4.0, gt=0, description="MMTM reduction: the squeeze layer has int(2 (C_0 + C_1) / ratio) units")
        placement: Optional[list[Annotated[int, Field(ge=0)]]] = Field(
            None, min_length=1,
            description="stages (0-based) after which an MMTM block sits; unset: every stage both encoders have "
            "(ResNet-18: after layers 1–4, as BMM; the authors' code: [1, 2, 3])",
        )
        variant: Literal["paper", "official"] = Field(
            "paper",
            description="official: modality 1's running gate mean is fed modality 0's gate (the authors' code), and "
            "start_epoch defaults to 1",
        )
        unimodal_weight: float = Field(
            0.0, ge=0, description="weight of the unimodal heads' losses; 0 trains them as detached probes only"
        )

    max_modalities = 2

    def __init__(self, config, modalities, num_classes):
        super().__init__(config, modalities, num_classes)
        official = config.variant == "official"
        self.start_epoch = config.start_epoch if config.start_epoch is not None else (1 if official else 2)
        self.blocks = nn.ModuleList()
        #: the stage index of each block (from the config and the encoders, so not state)
        self.positions: list[int] = []
        self.register_buffer("mu_main", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("mu_bypass", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("curation", torch.zeros((), dtype=torch.bool))
        self.register_buffer("curation_counter", torch.zeros((), dtype=torch.long))
        self.register_buffer("caring", torch.zeros((), dtype=torch.long))

    # -- setup: the MMTM blocks -------------------------------------------------------------------------
    def setup(self, model, ctx):
        if len(self.blocks):
            return
        staged = {}
        for m in self.modalities:
            encoder = model.encoders[m]
            stages = encoder.staged()
            if stages is None:
                kind = getattr(encoder, "registry_name", type(encoder).__name__)
                raise ConfigError(
                    f"greedy places MMTM blocks between encoder stages, but modality '{m}' uses encoder '{kind}', "
                    f"which has none; use one of {STAGED_ENCODERS} (model.encoders.{m})"
                )
            staged[m] = stages
        counts = [len(staged[m].stages) for m in self.modalities]
        common = min(counts)
        positions = sorted(set(self.config.placement)) if self.config.placement is not None else list(range(common))
        if positions[-1] >= common:
            shown = " and ".join(f"'{m}' has {n}" for m, n in zip(self.modalities, counts))
            raise ConfigError(
                f"greedy.placement={self.config.placement} names stage {positions[-1]}, but {shown} stages; "
                f"allowed: 0..{common - 1}"
            )
        a, b = (staged[m] for m in self.modalities)
        if self.config.variant == "official":
            unequal = [k for k in positions if a.widths[k] != b.widths[k]]
            if unequal:
                k = unequal[0]
                raise ConfigError(
                    f"greedy.variant=official feeds modality 1's running gate mean with modality 0's gate, which needs "
                    f"equal widths, but stage {k} has {a.widths[k]} and {b.widths[k]} channels; use variant=paper"
                )
        self.positions = positions
        for k in positions:
            self.blocks.append(MMTM((a.widths[k], b.widths[k]), self.config.ratio))

    # -- the lock-step forward --------------------------------------------------------------------------
    def lockstep(self, model, inputs, training_ctx=None) -> tuple[dict[str, Tensor], list[list[Tensor]]]:
        """(features, gates): both encoders stage by stage, MMTM k after stage ``positions[k]``.

        With ``training_ctx`` (a training forward) every block first adds its
        batch-mean gates to ḡ (averaged over processes) and, in curation, the
        caring modality's gate becomes ḡ_c.
        """
        staged = [model.encoders[m].staged() for m in self.modalities]
        prepared = [s.prepare(inputs[m]) for s, m in zip(staged, self.modalities)]
        maps = [h for h, _ in prepared]
        frames = [f for _, f in prepared]
        replaced = [self.curation & (self.caring == i) for i in range(2)] if training_ctx is not None else None
        used = []
        blocks = dict(zip(self.positions, self.blocks))
        for k in range(max(len(s.stages) for s in staged)):
            maps = [s.stages[k](h) if k < len(s.stages) else h for s, h in zip(staged, maps)]
            block = blocks.get(k)
            if block is None:
                continue
            gates = block.gates(maps, frames)
            if training_ctx is not None:
                gates = self.curate(block, gates, replaced, training_ctx)
            maps = block.apply_gates(maps, gates, frames)
            used.append(gates)
        features = {m: s.finish(h, f) for m, s, h, f in zip(self.modalities, staged, maps, frames)}
        return features, used

    def curate(self, block: MMTM, gates: list[Tensor], replaced: list[Tensor], ctx) -> list[Tensor]:
        """Update ḡ with this batch, then give the caring modality ḡ_c in place of its gate (in curation)."""
        with torch.no_grad():
            means = ctx.dist.mean(torch.cat([g.detach().float().mean(0) for g in gates]))
            means = list(means.split(block.dims))
            if self.config.variant == "official":
                means[1] = means[0]  # the authors' code updates both running means with modality 0's gate
            block.update_gate_means(means)
        return [
            torch.where(replaced[i], block.gate_mean(i).to(g.dtype).expand_as(g), g) for i, g in enumerate(gates)
        ]

    def encode(self, model, inputs):
        return self.lockstep(model, inputs)[0]

    def training_step(self, model, batch, ctx):
        in_curation = [self.curation & (self.caring == i) for i in range(2)]
        features, gates = self.lockstep(model, batch.inputs, ctx)
        logits = self.fuse(model, features)
        record = self.record(model, batch, features, logits=logits)
        record.add_loss("fused", cross_entropy(logits, batch))
        weight = self.config.unimodal_weight
        if weight > 0:
            record.unimodal = self.heads(model, features)
            record.add_loss("unimodal", weight * sum(cross_entropy(z, batch) for z in record.unimodal.values()))
        else:
            probe, record.unimodal = self.probe_loss(model, features, batch.labels)
            record.add_loss("probe", probe)
        record.shared[GATES] = gates
        for m, flag in zip(self.modalities, in_curation):
            record.logs[f"greedy/curation/{m}"] = flag.float()
        return record

    # -- the balance measure and the curation schedule ------------------------------------------------------
    def bypass_parameters(self, i: int) -> list[nn.Parameter]:
        """W_i of every block and the shared squeeze layers W_s."""
        return [p for block in self.blocks for layer in (block.excitation[i], block.squeeze_layer) for p in layer.parameters()]

    def after_backward(self, record, ctx):
        speeds = torch.stack([
            torch.stack([learning_speed(self.bypass_parameters(i)) for i in range(2)]),
            torch.stack([learning_speed(ctx.params.encoder[m]) for m in self.modalities]),
        ]).double()
        measured = ~self.curation
        self.mu_bypass.add_(torch.where(measured, speeds[0], 0.0))
        self.mu_main.add_(torch.where(measured, speeds[1], 0.0))
        bdr = bypass_dominance(self.mu_bypass, self.mu_main)
        d = bdr[0] - bdr[1]
        curation, counter, caring = curation_transition(
            self.curation, self.curation_counter, self.caring, d,
            self.config.epsilon, self.config.curation_steps, ctx.epoch >= self.start_epoch,
        )
        self.curation.copy_(curation)
        self.curation_counter.copy_(counter)
        self.caring.copy_(caring)
        record.logs["greedy/d_bdr"] = d.detach()
        for m, value in zip(self.modalities, bdr):
            record.logs[f"greedy/bdr/{m}"] = value.detach()
