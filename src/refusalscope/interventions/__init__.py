"""Edits of the forward pass as hook lists: directional ablation/addition and SAE-latent ablation/clamping."""

from refusalscope.interventions.base import Intervention, hooks_for
from refusalscope.interventions.direction import ActivationAddition, DirectionAblation

__all__ = ["ActivationAddition", "DirectionAblation", "Intervention", "hooks_for"]
