"""sslpipe: Hydra-composed experiments for self-supervised learning on images."""

__version__ = "0.1.0"
