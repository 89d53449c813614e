"""birdgen: bird images and animations from SDXL-Turbo, served by Triton."""

__version__ = "0.1.0"
