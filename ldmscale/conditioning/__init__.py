"""Conditioning kinds: one class per kind in a plain dict. The rest of the package asks `kind_for(cfg)`.

Add a kind with `register("name", MyConditioning)` (a `Conditioning` subclass) and `conditioner.kind=name`.
"""

from __future__ import annotations

from typing import Any

from ldmscale.conditioning.base import (
    Conditioning,
    Derived,
    SamplingConditions,
    SamplingContext,
    drop_mask,
    latents_of,
    replace_rows,
)
from ldmscale.conditioning.kinds import (
    ClassConditioning,
    InpaintConditioning,
    LayoutConditioning,
    SRConditioning,
    TextConditioning,
)
from ldmscale.conditioning.sdxl import SDXLConditioning


class NoneConditioning(Conditioning):
    """Unconditional (the base class's defaults)."""

    name = "none"


KINDS: dict[str, type[Conditioning]] = {
    "none": NoneConditioning,
    "text": TextConditioning,
    "sdxl": SDXLConditioning,
    "class": ClassConditioning,
    "layout": LayoutConditioning,
    "sr": SRConditioning,
    "inpaint": InpaintConditioning,
}


def register(name: str, cls: type[Conditioning]) -> None:
    """Make `conditioner.kind=name` build `cls` (a Conditioning subclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Conditioning)):
        raise TypeError(f"register({name!r}, ...): {cls!r} is not a Conditioning subclass")
    cls.name = name
    KINDS[name] = cls


def kind_for(cond_cfg: Any) -> Conditioning:
    """The Conditioning object of a `ConditionerConfig` (its `kind` names the class)."""
    if cond_cfg.kind not in KINDS:
        raise ValueError(f"conditioner.kind={cond_cfg.kind!r} is not one of {sorted(KINDS)}")
    return KINDS[cond_cfg.kind](cond_cfg)


def kind_named(name: str, **fields: Any) -> Conditioning:
    """The Conditioning of kind `name` with default settings plus `fields` (for callers without a config)."""
    from ldmscale.config import ConditionerConfig

    return kind_for(ConditionerConfig(kind=name, **fields))


__all__ = ["KINDS", "Conditioning", "Derived", "SamplingConditions", "SamplingContext", "NoneConditioning",
           "TextConditioning", "SDXLConditioning", "ClassConditioning", "LayoutConditioning", "SRConditioning",
           "InpaintConditioning", "drop_mask", "kind_for", "kind_named", "latents_of", "register", "replace_rows"]
