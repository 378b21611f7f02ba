"""Loud errors instead of silent divergence: what every rank must agree on.

- :mod:`.consistency`: settings and parameter order, compared across ranks at construction.
- :mod:`.replicas`: replicated parameters and gradients, compared on the first step.
- :mod:`.fsdp2_names`: names of FSDP2 parameters, for those comparisons.
"""
