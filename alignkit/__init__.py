"""alignkit: post-training toolkit."""
__version__ = "0.1.0"
