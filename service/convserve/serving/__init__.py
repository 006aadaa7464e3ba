"""Serving: decode a request (codec, images), load and run a model (loader, runners), swap models
without downtime (manager) and batch concurrent requests (batcher). Never imports torch."""
