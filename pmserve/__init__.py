"""pmserve: continual LoRA fine-tuning with Perturb-and-Merge (arXiv 2505.22389)."""

__version__ = "0.1.0"
