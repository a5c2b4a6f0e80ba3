"""Fast checks of whether the Hugging Face Hub (or another server, e.g. wandb's) can be reached, and a switch to
the local cache.

`datasets`, `transformers`, `huggingface_hub` and `wandb` retry unreachable hosts for tens of seconds or minutes
before failing, so callers probe the endpoint first and fall back (to the local cache, to offline logging) when it is
down.
"""
import contextlib
import functools
import os
import socket
import threading
import urllib.parse
from typing import Iterator

import datasets.config
import huggingface_hub.constants

OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
DEFAULT_PORTS = {"https": 443, "http": 80}


def hub_reachable(timeout_s: float = 5.0) -> bool:
    """Whether a TCP connection to the Hub endpoint opens within `timeout_s` seconds.

    The endpoint is `huggingface_hub.constants.ENDPOINT` (`HF_ENDPOINT`, default
    https://huggingface.co). The result is cached per process and endpoint.
    """
    return endpoint_reachable(huggingface_hub.constants.ENDPOINT, timeout_s)


def endpoint_reachable(url: str, timeout_s: float) -> bool:
    """Whether a TCP connection to the host of `url` (e.g. https://api.wandb.ai) opens within `timeout_s` seconds;
    cached per process, host and port."""
    host, port = _endpoint_address(url)
    return _can_connect(host, port, timeout_s)


def offline_requested() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE).

    Read at call time, unlike the libraries' own flags, which are frozen when they are imported.
    """
    flags = [os.environ.get(var, "") for var in OFFLINE_ENV_VARS]
    return huggingface_hub.constants.HF_HUB_OFFLINE or any(flag.upper() in TRUE_VALUES for flag in flags)


@contextlib.contextmanager
def forced_offline() -> Iterator[None]:
    """Makes `datasets` and `huggingface_hub` use only the local cache inside the `with` block."""
    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
             datasets.config.HF_DATASETS_OFFLINE)
    # Both libraries read these module attributes on every request, so patching them takes effect.
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
         datasets.config.HF_DATASETS_OFFLINE) = saved


def _endpoint_address(endpoint: str) -> tuple[str, int]:
    """(host, port) of an endpoint URL such as 'https://huggingface.co' or 'http://127.0.0.1:8080'."""
    url = urllib.parse.urlsplit(endpoint)
    return url.hostname or "", url.port or DEFAULT_PORTS.get(url.scheme, 443)


@functools.cache
def _can_connect(host: str, port: int, timeout_s: float) -> bool:
    outcome: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    # DNS resolution ignores socket timeouts and can hang, so the attempt runs in a daemon thread
    # that we stop waiting for (and that cannot keep the process alive).
    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome == [True]
