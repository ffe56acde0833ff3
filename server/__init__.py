"""Quiver's gRPC server: one resident base model, a continuous-batching engine, many task adapters."""
