"""sslpipe: Hydra-composed experiments for self-supervised learning on images.

The command is `python -m sslpipe` (sslpipe/__main__.py); docs/architecture.md maps the package.
`sslpipe.load_encoder(folder)` rebuilds and loads an export folder's encoder (sslpipe.tensorfiles);
it is imported on first use, so `import sslpipe` stays free of torch."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_encoder":
        from sslpipe.tensorfiles import load_encoder

        return load_encoder
    raise AttributeError(f"module 'sslpipe' has no attribute {name!r}")
