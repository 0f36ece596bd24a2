"""jaxinfer's servers over one AsyncEngine: gRPC `jaxinfer.v1.GenerationService` (with health checking and
reflection), OpenAI-compatible HTTP, Prometheus metrics, and the absl launcher (`python -m serve.launch`).
See docs/ARCHITECTURE.md ("serve/")."""
