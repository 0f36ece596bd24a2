"""Servers over jaxinfer.AsyncEngine (gRPC Generate, OpenAI-compatible HTTP, absl launcher): on the roadmap,
not implemented yet. AsyncEngine (jaxinfer/async_engine.py) is the interface they will use."""
