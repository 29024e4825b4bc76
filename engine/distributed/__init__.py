"""More than one GPU on torch.distributed: process groups (`parallel_state`) and the collectives the model uses
(`collectives`, fixed-order where batch invariance needs it). NCCL on GPUs, gloo on CPU; no other transport."""
