"""Starting and stopping torch.distributed the way clusters launch jobs (torchrun, mpirun)."""
