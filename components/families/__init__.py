"""Model families: one module per way of training a network (diffusion.py, transformer.py, mdlm.py).

The registry in registry.py maps each backbone to its family; ask it, never a table of your own.
"""
from components.families.registry import BACKBONES, Backbone, backbone, backbone_of_class, family_of

__all__ = ["BACKBONES", "Backbone", "backbone", "backbone_of_class", "family_of"]
