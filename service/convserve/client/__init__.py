"""The client SDK: `Client` and `AsyncClient` with the same methods, and what they return.

    from convserve.client import Client
    with Client("localhost:50051") as client:
        job = client.train(dataset="digits", epochs=10)

Needs only grpcio, grpcio-health-checking, protobuf and numpy (a bare `pip install convserve`).
"""

from convserve.client.calls import Job, Prediction, TrainOptions
from convserve.client.sdk import AsyncClient, Client
from convserve.errors import ClientError

__all__ = ["AsyncClient", "Client", "ClientError", "Job", "Prediction", "TrainOptions"]
