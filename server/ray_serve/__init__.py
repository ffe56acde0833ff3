"""Quiver past one machine on Ray Serve: an ingress deployment (OpenAI HTTP routes and gRPC GenerationService)
over engine replicas, with the request's adapter as Ray's multiplexed model id so a request reaches a replica that
already holds its adapter, and one shared (S3) adapter store."""
