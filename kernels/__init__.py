"""Elementwise kernels of distsoap, installed as ``distsoap.kernels``.

Each op family has one file holding its torch implementation, which is the definition of
correct and the fallback on every device. Triton versions are planned (issue "Speed"); none is
shipped yet, so every call here runs the torch implementation.
"""

from .rotated_adam import rotated_adam_direction

__all__ = ["rotated_adam_direction"]
