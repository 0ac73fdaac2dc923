"""Tensor parallelism over `torch.distributed`: the group a model is sharded over (`group`), who runs which rank
(`launch`), and the pieces every rank uses (`runtime`: store and process group, the head's message channel, child
processes). The runtime that starts and drives the ranks around the engine is mistralrs/engine/tensor_parallel.py."""
