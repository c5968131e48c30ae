"""guidelab: classifier guidance and classifier-free guidance for diffusion models, side by side."""

__version__ = "0.1.0"
