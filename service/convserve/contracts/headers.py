"""The gRPC metadata keys (and HTTP headers) client and server agree on."""

import re

AUTHORIZATION = "authorization"       # "Bearer <token>" for the methods auth protects
REQUEST_ID_HEADER = "x-request-id"    # a caller's id for its call; the server echoes it in trailers
# A caller's id is kept only when it is a sane token (it ends up in logs); else the server makes one.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
