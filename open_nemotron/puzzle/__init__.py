"""Puzzle: blockwise local distillation, block scoring and the MIP search over heterogeneous child architectures."""
