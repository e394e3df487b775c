"""Which parameters belong to what: the explicit partition gradient modulators rely on.

Methods never assign parameters to a modality by matching names (a fusion
layer called ``audio_proj`` would be mistaken for the audio encoder); they
read these groups, built from the modules themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ParameterGroups:
    """``encoder[m]``, ``heads[m]``, ``fusion`` and, after ``setup``, ``method[part]``."""

    encoder: dict[str, list[nn.Parameter]]
    heads: dict[str, list[nn.Parameter]]
    fusion: list[nn.Parameter]
    method: dict[str, list[nn.Parameter]] = field(default_factory=dict)

    @classmethod
    def of(cls, model, parts: dict[str, nn.Module] | None = None) -> "ParameterGroups":
        groups = cls(
            encoder={m: list(e.parameters()) for m, e in model.encoders.items()},
            heads={m: list(h.parameters()) for m, h in model.unimodal_heads.items()},
            fusion=list(model.fusion.parameters()),
        )
        for name, part in (parts or {}).items():
            groups.method[name] = list(part.parameters())
        return groups

    def all(self) -> list[nn.Parameter]:
        """Every parameter once, model first, in a fixed order (the optimizer's)."""
        seen: set[int] = set()
        out = []
        for group in [*self.encoder.values(), *self.heads.values(), self.fusion, *self.method.values()]:
            for p in group:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.all() if p.requires_grad]
