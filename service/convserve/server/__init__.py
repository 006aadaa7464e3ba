"""The gRPC server: servicers and the messages they build, auth, settings, metrics, logs, the
server's lifecycle and its worker processes."""
