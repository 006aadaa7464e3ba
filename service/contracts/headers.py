"""The gRPC metadata keys client and server agree on."""

AUTHORIZATION = "authorization"       # "Bearer <token>" for the methods auth protects
REQUEST_ID_HEADER = "x-request-id"    # a caller's id for its call; the server echoes it in trailers
