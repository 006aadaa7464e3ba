"""Pixels in, the serving model and its probabilities out: through the dynamic batcher for the live
model, or a direct call for a pinned version (rare, and possibly a load: off the event loop). The
one path both Predict and the Open Inference Protocol's ModelInfer take."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from prometheus_client import Counter

from convserve.serving.batcher import DynamicBatcher
from convserve.serving.loader import LoadedModel
from convserve.serving.manager import ModelManager


class Predictor:
    def __init__(self, manager: ModelManager, batcher: DynamicBatcher) -> None:
        self.manager = manager
        self._batcher = batcher
        self.images = Counter("convserve_images", "Images served, by the model version that "
                              "served them", ("version",), registry=None)
        self._served: dict[int, Any] = {}

    async def predict(self, pixels: np.ndarray, version: int = 0
                      ) -> tuple[LoadedModel, np.ndarray]:
        """`version` 0: the live model, batched; N: version N (VersionNotFound: NOT_FOUND)."""
        if version:
            model = await asyncio.to_thread(self.manager.get, version)
            probabilities = await asyncio.to_thread(model.predict, pixels)
        else:
            model, probabilities = await self._batcher.predict(pixels)
        served = self._served.get(model.version)
        if served is None:  # one child per version, looked up once
            served = self._served[model.version] = self.images.labels(str(model.version))
        served.inc(len(pixels))
        return model, probabilities
