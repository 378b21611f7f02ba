"""Run Triton kernels in the interpreter when there is no GPU (set before Triton loads them).

Triton decides at import whether its own ``triton.language`` functions are interpreted, so a
test module collected earlier that imports Triton (``torch.utils.flop_counter`` does) would
leave every kernel test failing with "Cannot call @triton.jit'd outside of the scope of a
kernel". That is refused here, at collection, with the reason.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    language = sys.modules.get("triton.language")
    if language is not None and os.environ["TRITON_INTERPRET"] == "1":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(language.zeros, InterpretedFunction):
            raise RuntimeError(
                "Triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1, "
                "so its interpreter cannot run the kernel tests: import Triton (or "
                "torch.utils.flop_counter) inside the tests that need it, not at module level"
            )
