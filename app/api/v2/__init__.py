"""The Open Inference Protocol (KServe v2 / Triton HTTP), beside /v1 and sharing its batchers:
``schemas`` (the request shape), ``codec`` (tensors to images and probabilities to outputs, pure
functions) and ``routes`` (thin HTTP routes)."""

from app.api.v2.routes import open_router, router

__all__ = ["open_router", "router"]
