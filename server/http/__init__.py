"""The OpenAI-compatible HTTP front: a thin translation of OpenAI's Completions and Chat Completions APIs (and
vLLM's adapter-loading routes) onto the same core services as gRPC."""
