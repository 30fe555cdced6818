"""evalserve: an inference REST microservice for PyTorch image classifiers."""

__version__ = "0.1.0"
