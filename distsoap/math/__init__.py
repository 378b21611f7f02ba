"""SOAP's math: batched functions on stacks of same-shape blocks, and the readable reference.

- :mod:`distsoap.math.rotations`: rotate into / out of the eigenbases, Kronecker-factor EMA.
- :mod:`distsoap.math.bases`: first eigendecomposition and the QR refresh.
- :mod:`distsoap.math.reference`: per-parameter SOAP written line by line from docs/algorithm.md.
"""
