"""perceptual-diffusion: diffusion models trained with the self-perceptual objective (Lin & Yang, arXiv 2401.00110)."""

__version__ = "0.1.0"
