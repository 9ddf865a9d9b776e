"""Fused LoRA + perturbation kernels (Triton) and their PyTorch references."""
