"""Rank-wise mixtures of LoRA experts (SMoRA, MixLoRA, FlyLoRA), rank-wise merging (LoRA-LEGO) and compression
(LoRA-Squeeze). Importing this package registers the parameterizations ``smora``, ``mixlora``, ``flylora``."""

from .layers import FlyLoRA, MixLoRA, RoutedLoRA, SMoRA, routed_layers

__all__ = ["FlyLoRA", "MixLoRA", "RoutedLoRA", "SMoRA", "routed_layers"]
