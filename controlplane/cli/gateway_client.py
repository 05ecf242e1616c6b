"""fpctl's HTTP client of the gateway: the OpenAI API, streamed, with errors made plain."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from common.errors import FlexPipeError


class GatewayError(FlexPipeError):
    """The gateway refused or failed a request; ``status`` is the HTTP status (0: not reached)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class GatewayClient:
    """Streams completions and chat completions from ``base_url`` (``http://host:port``). Leaving a
    stream early closes its connection, which makes the gateway abort the request."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout_s, connect=5.0))

    def __enter__(self) -> GatewayClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.http.close()

    def models(self) -> list[str]:
        """The ids of the models the gateway serves."""
        try:
            response = self.http.get("/v1/models")
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.base_url}: {exc}") from None
        return [model["id"] for model in response.json()["data"]]

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The JSON events of ``POST path`` with ``stream: true``, up to ``[DONE]``; raises
        ``GatewayError`` for an error status, an error event, or a gateway that cannot be reached."""
        try:
            with self.http.stream("POST", path, json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise GatewayError(_error_text(response), response.status_code)
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise GatewayError(f"request failed: {event['error'].get('message')}", 500)
                    yield event
        except httpx.TimeoutException:
            raise GatewayError(f"the gateway at {self.base_url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.base_url}: {exc}") from None


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error.get('type')}: {error.get('message')}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code}: {response.text[:300]}"
