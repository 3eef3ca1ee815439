"""A Python client of the demo's API: the same answers the page draws, as NumPy arrays.

    client = DemoClient("http://127.0.0.1:8765")
    info = client.info()                                   # columns, corruptions, samples
    result = client.segment("sample-3", box=[40, 30, 200, 180], corruption="fog", severity=3)
    result["columns"][0]["mask"], result["columns"][0]["predicted_iou"]

An answer of HTTP 400 raises :class:`gara.demo.session.DemoError` with the page's message; a
server failure (500) raises RuntimeError. ``predicted_iou`` and ``iou`` are fractions.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from gara.demo.session import CLEAN, DemoError


def _png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


class DemoClient:
    def __init__(self, url: str, timeout: float = 300.0) -> None:
        import httpx

        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DemoClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answer(self, response) -> Any:
        if response.status_code == 400:
            raise DemoError(response.json()["error"])
        if response.status_code >= 500:
            raise RuntimeError(f"the demo server failed: {response.text[:500]}")
        response.raise_for_status()
        return response.json() if response.headers.get("content-type", "").startswith("application/json") \
            else response.content

    def info(self) -> dict[str, Any]:
        return self._answer(self._http.get("/api/info"))

    def picture(self, picture_id: str, corruption: str = CLEAN, severity: int = 3) -> np.ndarray:
        """The picture as the models see it: (H, W, 3) uint8."""
        params = {"corruption": corruption, "severity": severity}
        return _png_array(self._answer(self._http.get(f"/api/pictures/{picture_id}.png", params=params)))

    def upload(self, image: bytes | str | Path, name: str | None = None) -> dict[str, Any]:
        """An image file (path or bytes) -> {"id", "width", "height"}; segment it by its id."""
        if not isinstance(image, bytes):
            name = name or Path(image).name
            image = Path(image).read_bytes()
        body = {"name": name or "upload", "data": base64.b64encode(image).decode()}
        return self._answer(self._http.post("/api/uploads", json=body))

    def segment(self, picture: str, box: list[float] | None = None, points: list[list[float]] | None = None,
                point_labels: list[int] | None = None, corruption: str = CLEAN, severity: int = 3,
                annotation_id: int | None = None) -> dict[str, Any]:
        """Every column's answer for one object; each column's ``mask`` is (H, W) bool (None
        when the column has an ``error``), and so is the ``annotation`` it is scored on."""
        body = {"picture": picture, "box": box, "points": points, "point_labels": point_labels,
                "corruption": corruption, "severity": severity, "annotation_id": annotation_id}
        result = self._answer(self._http.post("/api/segment", json=body))
        for item in [*result["columns"], *([result["annotation"]] if result["annotation"] else [])]:
            png = item.pop("mask_png")
            item["mask"] = None if png is None else _png_array(base64.b64decode(png)) > 0
        return result
