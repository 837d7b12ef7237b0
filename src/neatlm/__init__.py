"""neatlm: language models whose components learn at test time, with gradients you can trust."""

__version__ = "0.1.0"
