"""Python clients for an evalserve server, sync and async, on httpx.

    from app.client import Client

    with Client("http://127.0.0.1:8000") as client:
        prediction = client.predict("cat.jpg", top_k=3)
        print(prediction.classes[0].label)

Images may be a path, bytes or a PIL image. Every error the server answers is raised as
``EvalserveError`` with its status code and the server's message.

Retries. A prediction has no side effects, so sending it again is safe. Within one budget of
``retries`` resends per call, a client resends a request

- answered 503, after the server's ``Retry-After`` (``default_retry_wait`` without one), and
- whose connection could not be opened, or was reset or closed before the response's status line
  and headers arrived (``httpx.ConnectError``, ``ReadError``, ``WriteError``, and
  ``RemoteProtocolError`` "Server disconnected without sending a response"), after
  ``connection_retry_wait`` seconds, doubling each time;

every wait capped at ``max_retry_wait``. It never resends after a timeout (a slow server is not
helped by a second copy of the work) nor once the response's head has arrived (a body cut off
midway raises). When the budget is spent, the last error is raised: ``EvalserveError`` for a
503, the ``httpx.TransportError`` for a lost connection. ``client.retried`` counts the resends
so far, by cause, for callers that report them.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from app.api.schemas import ImagePrediction, LabelList, ModelInfo, ModelList, PredictResponse

ImageInput = str | Path | bytes | Image.Image
DEFAULT_URL = "http://127.0.0.1:8000"


class EvalserveError(Exception):
    """The server answered with an error (a 503 only once the retries are spent)."""

    def __init__(
        self, status_code: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _as_upload(image: ImageInput, position: int) -> tuple[str, bytes]:
    if isinstance(image, str | Path):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, bytes | bytearray):
        return f"image-{position}", bytes(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")  # lossless, so the server sees exactly these pixels
        return f"image-{position}.png", buffer.getvalue()
    raise TypeError(f"cannot send {type(image).__name__} as an image")


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare for 503s from evalserve; fall back to the default


def _error(response: httpx.Response) -> EvalserveError:
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200] or response.reason_phrase
    return EvalserveError(response.status_code, code, message, _retry_after(response))


def _predict_request(
    images: Sequence[ImageInput], model: str | None, top_k: int | None
) -> dict[str, Any]:
    if not images:
        raise ValueError("no images to predict")
    path = f"/v1/models/{model}/predict" if model else "/v1/predict"
    files = [("file", _as_upload(image, i)) for i, image in enumerate(images)]
    params = {"top_k": top_k} if top_k is not None else {}
    return {"method": "POST", "url": path, "files": files, "params": params}


def resendable(exc: httpx.TransportError) -> bool:
    """Whether a transport error raised before any response head arrived is worth a resend: the
    connection failed, was reset or was closed, but did not time out (a request that timed out
    reached a server that is slow, not gone)."""
    if isinstance(exc, httpx.NetworkError):  # connect, read, write or close failed
        return True
    # httpcore's words for end of file before a response: other RemoteProtocolErrors are a
    # malformed answer, bytes that did arrive.
    return isinstance(exc, httpx.RemoteProtocolError) and "without sending a response" in str(exc)


@dataclass
class Retried:
    """Requests a client has sent again so far, by cause."""

    connection: int = 0  # the connection failed, or was reset or closed before a response
    overloaded: int = 0  # the server answered 503

    @property
    def total(self) -> int:
        return self.connection + self.overloaded


class _Options:
    def __init__(
        self,
        retries: int,
        max_retry_wait: float,
        default_retry_wait: float,
        connection_retry_wait: float,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.default_retry_wait = default_retry_wait
        self.connection_retry_wait = connection_retry_wait
        self.retried = Retried()
        self._lock = threading.Lock()  # the sync client may be shared by threads

    def wait_for(self, error: EvalserveError | httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait before resending (and the resend counted), or None to give up."""
        if attempt >= self.retries:
            return None
        if isinstance(error, EvalserveError):
            if error.status_code != 503:
                return None
            wait = error.retry_after if error.retry_after is not None else self.default_retry_wait
        elif resendable(error):
            wait = self.connection_retry_wait * 2**attempt
        else:
            return None
        with self._lock:
            if isinstance(error, EvalserveError):
                self.retried.overloaded += 1
            else:
                self.retried.connection += 1
        return min(wait, self.max_retry_wait)


class Client:
    """Blocking client. Use as a context manager, or call ``close()``. A request answered 503,
    or whose connection was lost before any response, is sent again up to ``retries`` times (the
    module's docstring says exactly when); ``retried`` counts the resends."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        default_retry_wait: float = 1.0,
        connection_retry_wait: float = 0.1,
        **httpx_options: Any,
    ) -> None:
        self._options = _Options(retries, max_retry_wait, default_retry_wait, connection_retry_wait)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, **httpx_options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def retried(self) -> Retried:
        """The resends so far, by cause (see the module's docstring)."""
        return self._options.retried

    def _send(self, request: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            error: EvalserveError | httpx.TransportError
            try:
                # stream=True returns once the head has arrived: what fails before is a
                # connection lost before any response, what fails in read() is not.
                response = self._http.send(self._http.build_request(**request), stream=True)
            except httpx.TransportError as exc:
                error = exc
            else:
                try:
                    response.read()
                finally:
                    response.close()
                if response.is_success:
                    return response
                error = _error(response)
            wait = self._options.wait_for(error, attempt)
            if wait is None:
                raise error
            attempt += 1
            time.sleep(wait)

    def predict(
        self, image: ImageInput, top_k: int | None = None, *, model: str | None = None
    ) -> ImagePrediction:
        """Top-k classes of one image."""
        return self.predict_many([image], top_k, model=model)[0]

    def predict_many(
        self, images: Sequence[ImageInput], top_k: int | None = None, *, model: str | None = None
    ) -> list[ImagePrediction]:
        """Top-k classes of several images, sent in one request, in order."""
        response = self._send(_predict_request(images, model, top_k))
        return PredictResponse.model_validate_json(response.content).predictions

    def health(self) -> bool:
        """Whether the server is ready (200 on /health/ready)."""
        return self._http.get("/health/ready").status_code == 200

    def models(self) -> list[ModelInfo]:
        return ModelList.model_validate_json(
            self._send({"method": "GET", "url": "/v1/models"}).content
        ).models

    def labels(self, model: str) -> list[str]:
        """The model's class names, in output-index order."""
        response = self._send({"method": "GET", "url": f"/v1/models/{model}/labels"})
        return LabelList.model_validate_json(response.content).labels


class AsyncClient:
    """The same API for asyncio: ``async with AsyncClient(url) as client: await ...``, with the
    same resends, counted in ``retried``."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        default_retry_wait: float = 1.0,
        connection_retry_wait: float = 0.1,
        **httpx_options: Any,
    ) -> None:
        self._options = _Options(retries, max_retry_wait, default_retry_wait, connection_retry_wait)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **httpx_options)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def retried(self) -> Retried:
        """The resends so far, by cause (see the module's docstring)."""
        return self._options.retried

    async def _send(self, request: dict[str, Any]) -> httpx.Response:
        attempt = 0
        while True:
            error: EvalserveError | httpx.TransportError
            try:
                # As in Client._send: only what fails before the head arrives is resent.
                response = await self._http.send(self._http.build_request(**request), stream=True)
            except httpx.TransportError as exc:
                error = exc
            else:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                if response.is_success:
                    return response
                error = _error(response)
            wait = self._options.wait_for(error, attempt)
            if wait is None:
                raise error
            attempt += 1
            await asyncio.sleep(wait)

    async def predict(
        self, image: ImageInput, top_k: int | None = None, *, model: str | None = None
    ) -> ImagePrediction:
        return (await self.predict_many([image], top_k, model=model))[0]

    async def predict_many(
        self, images: Sequence[ImageInput], top_k: int | None = None, *, model: str | None = None
    ) -> list[ImagePrediction]:
        response = await self._send(_predict_request(images, model, top_k))
        return PredictResponse.model_validate_json(response.content).predictions

    async def health(self) -> bool:
        return (await self._http.get("/health/ready")).status_code == 200

    async def models(self) -> list[ModelInfo]:
        response = await self._send({"method": "GET", "url": "/v1/models"})
        return ModelList.model_validate_json(response.content).models

    async def labels(self, model: str) -> list[str]:
        response = await self._send({"method": "GET", "url": f"/v1/models/{model}/labels"})
        return LabelList.model_validate_json(response.content).labels
