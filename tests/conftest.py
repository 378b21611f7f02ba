"""Suite-wide set-up: what the fork server of distsoap.testing.local_ranks imports once.

DeepSpeed's ZeRO optimizer check imports its Muon module, which calls ``torch.compile`` at import
time and so imports TorchInductor: about 3 s in every rank of every DeepSpeed test, paid once in
the fork server instead. Left out where DeepSpeed is not installed.
"""

from distsoap.testing.local_ranks import preload

preload("deepspeed.runtime.zero.muon.muon_optimizer")
