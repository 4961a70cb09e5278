"""duokit: efficient long-video understanding with vision-language models."""

__version__ = "0.1.0"
