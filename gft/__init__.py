"""gft: Group Fine-Tuning (arXiv 2604.14258) for causal language models.

One objective spans SFT, DFT, GRPO and GFT (presets in gft.config.PRESETS); the math is
in gft.objective, the loop in gft.loop, the backend port in gft.backend; the backends
(torch, mlx) that implement it are the separate `backends` package.
"""
__version__ = "0.1.0"
