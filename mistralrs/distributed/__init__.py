"""Tensor parallelism over `torch.distributed`: the group a model is sharded over, and the runtime that starts
and drives the ranks."""
