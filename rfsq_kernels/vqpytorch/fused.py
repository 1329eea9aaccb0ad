"""Autograd / torch.compile glue around the fused ResidualFSQ kernels (placeholder until wired)."""
