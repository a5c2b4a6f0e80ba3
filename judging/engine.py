"""Concurrent, paced and retried chat-completion requests to OpenAI-compatible endpoints.

The engine knows nothing about what it asks: it takes `ChatRequest`s, sends each through `openai.AsyncOpenAI`
with bounded concurrency, retries what is worth retrying, and hands every finished request to a callback as a
`ChatReply` (the text, or an error after the last retry). Resuming is the caller's: `request_key` names a request
by its content, so a log of replies keyed by it is a cache (see judging/cache.py). The API key comes from the
environment and is never returned, logged or written.

    endpoint = Endpoint.parse("my-model@http://localhost:8000/v1")
    engine = ChatEngine(endpoint, EngineSettings(concurrency=16, sleep_time=0))
    run_engines([(engine, requests, lambda position, reply: print(position, reply.text))])
"""

import asyncio
import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import openai

from errors import HalosError

PLACEHOLDER_API_KEY = "EMPTY"  # local OpenAI-compatible servers accept any key
MAX_BACKOFF_SECONDS = 60.0
# 401/403/404 mean a wrong key, model or URL: every later request would fail the same way.
FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)
RETRYABLE_STATUSES = {408, 409, 429}
ENDPOINT_IN_SPEC = re.compile(r"^(?P<model>.+)@(?P<url>https?://\S+)$")


class JudgeRejectedError(HalosError):
    """The endpoint refused a request in a way that retrying cannot fix (HTTP 401, 403, 404)."""


class JudgeUnreachableError(HalosError):
    """The endpoint never answered: its first requests all failed to connect or timed out."""


class EmptyReplyError(Exception):
    """A 200 reply that carries no text (no choices, no message, null or blank content)."""


@dataclass(frozen=True)
class Endpoint:
    """A chat model behind an OpenAI-compatible endpoint; `base_url` None is OpenAI (or env OPENAI_BASE_URL)."""

    model: str
    base_url: str | None = None

    @classmethod
    def parse(cls, spec: str, default_base_url: str | None = None) -> "Endpoint":
        """`MODEL` (served at `default_base_url`) or `MODEL@http(s)://host/v1`."""
        match = ENDPOINT_IN_SPEC.match(spec)
        if match:
            return cls(match["model"], match["url"])
        return cls(spec, default_base_url or None)


@dataclass(frozen=True)
class ChatRequest:
    """One chat completion to ask for. `template` names the prompt template; it only enters the key."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    template: str = ""

    def body(self, model: str) -> dict:
        """The request parameters as sent (and as stored beside the reply)."""
        body = {"model": model, "messages": self.messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def request_key(model: str, request: ChatRequest) -> str:
    """sha256 of the request body and template: equal keys ask the same model the same thing."""
    canonical = json.dumps({"template": request.template, **request.body(model)}, sort_keys=True,
                           ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatReply:
    """A finished request: `text` is the reply, or None with `error` set after the last attempt.

    Token counts are the endpoint's `usage`, summed over every attempt that reported one.
    """

    text: str | None
    error: str | None
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class EngineSettings:
    """How requests are made: concurrency, pacing, retries and when to give up on an endpoint."""

    concurrency: int = 4
    sleep_time: float = 0.5  # minimum seconds between two request starts
    max_retries: int = 5
    timeout: float = 30.0  # per request, in seconds
    backoff: float = 1.0  # first retry delay in seconds; doubles on each later retry
    # An endpoint that has not answered once is given up after this many consecutive failed connections
    # (or timeouts), instead of retrying every request against a dead URL.
    unreachable_after: int = 3


def api_key_for(endpoint: Endpoint) -> str:
    """The API key from env OPENAI_API_KEY; a placeholder for a custom endpoint without one."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if endpoint.base_url or os.environ.get("OPENAI_BASE_URL"):
        return PLACEHOLDER_API_KEY
    raise HalosError("set OPENAI_API_KEY (or give --base_url for a server that needs no key)")


def is_retryable(error: Exception) -> bool:
    """Rate limits, server errors, timeouts, dropped connections and malformed 200 replies are worth retrying."""
    if isinstance(error, openai.APIStatusError):
        return error.status_code in RETRYABLE_STATUSES or error.status_code >= 500
    return True


def retry_after_seconds(error: Exception) -> float:
    """The server's Retry-After hint in seconds, or 0 if it gave none."""
    response = getattr(error, "response", None)
    try:
        return float(response.headers.get("retry-after", 0)) if response is not None else 0.0
    except (AttributeError, ValueError):
        return 0.0


def describe_error(error: Exception, secret: str) -> str:
    """One-line description of a failed request, with the API key blanked out."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text.replace(secret, "***") if secret else text


def reply_text(completion: object) -> str:
    """The text of a chat completion's first choice; EmptyReplyError if it carries none.

    The SDK builds replies without validation: `choices` may be missing, empty or not a list, `message` missing
    and `content` null; a 200 body that is not an object comes back as a plain str or list.
    """
    choices = getattr(completion, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise EmptyReplyError(f"the reply has no choices ({type(completion).__name__})")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str) or not content.strip():
        raise EmptyReplyError(f"the reply's first choice has no text (content {content!r})")
    return content


def reply_usage(completion: object) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a reply, 0 where the endpoint reported none."""
    usage = getattr(completion, "usage", None)
    counts = [getattr(usage, name, 0) for name in ("prompt_tokens", "completion_tokens")]
    return tuple(count if isinstance(count, int) else 0 for count in counts)


class RequestPacer:
    """Spaces request starts at least `spacing` seconds apart across all concurrent tasks."""

    def __init__(self, spacing: float):
        self.spacing = spacing
        self._lock = asyncio.Lock()
        self._next_start = 0.0

    async def wait_turn(self) -> None:
        async with self._lock:
            loop = asyncio.get_running_loop()
            delay = self._next_start - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_start = loop.time() + self.spacing


@dataclass
class EndpointHealth:
    """Counts connection failures in a row, to stop early against an endpoint that never answers."""

    base_url: str
    limit: int
    answered: bool = False
    failures_in_a_row: int = 0
    given_up: JudgeUnreachableError | None = None

    def reached(self) -> None:
        """Any HTTP reply, even an error status, shows the endpoint is there."""
        self.answered, self.failures_in_a_row = True, 0

    def failed_to_connect(self, error: openai.APIConnectionError, secret: str) -> None:
        self.failures_in_a_row += 1
        if not self.answered and self.failures_in_a_row >= self.limit and self.given_up is None:
            self.given_up = JudgeUnreachableError(
                f"judge endpoint {self.base_url} is unreachable: {self.failures_in_a_row} requests in a row failed "
                f"({describe_error(error, secret)}); check --base_url, the server and --timeout")
        self.check()

    def check(self) -> None:
        """Raise once the endpoint is given up, so that no request is sent after that."""
        if self.given_up is not None:
            raise self.given_up


@dataclass
class ChatEngine:
    """Sends requests to one endpoint; `run` is a coroutine, `run_engines` drives several at once."""

    endpoint: Endpoint
    settings: EngineSettings = field(default_factory=EngineSettings)
    # Separate from any other RNG so that retries change nothing else.
    jitter_rng: random.Random = field(default_factory=random.Random)

    async def run(self, requests: Sequence[ChatRequest], on_reply: Callable[[int, ChatReply], None]) -> None:
        """Complete every request, calling `on_reply(position, reply)` as each one finishes (any order).

        Raises JudgeRejectedError on HTTP 401/403/404 and JudgeUnreachableError for a dead endpoint; requests
        still in flight are then cancelled, and replies already handed over stay handed over.
        """
        api_key = api_key_for(self.endpoint)
        async with openai.AsyncOpenAI(api_key=api_key, base_url=self.endpoint.base_url,
                                      timeout=self.settings.timeout, max_retries=0) as client:
            health = EndpointHealth(str(client.base_url), self.settings.unreachable_after)
            semaphore = asyncio.Semaphore(self.settings.concurrency)
            pacer = RequestPacer(self.settings.sleep_time)

            async def complete(position: int) -> tuple[int, ChatReply]:
                async with semaphore:
                    return position, await self._complete(client, requests[position], pacer, health, api_key)

            tasks = [asyncio.ensure_future(complete(position)) for position in range(len(requests))]
            try:
                for finished in asyncio.as_completed(tasks):
                    on_reply(*await finished)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, client: openai.AsyncOpenAI, request: ChatRequest, pacer: RequestPacer,
                        health: EndpointHealth, secret: str) -> ChatReply:
        """One request, retried; every failure short of a fatal one ends as an error reply, never an exception."""
        attempts = prompt_tokens = completion_tokens = 0
        while True:
            attempts += 1
            await pacer.wait_turn()
            health.check()
            try:
                completion = await client.chat.completions.create(**request.body(self.endpoint.model))
                health.reached()
                used = reply_usage(completion)
                prompt_tokens, completion_tokens = prompt_tokens + used[0], completion_tokens + used[1]
                text = reply_text(completion)
                return ChatReply(text, None, attempts, prompt_tokens, completion_tokens)
            except FATAL_ERRORS as error:
                raise JudgeRejectedError(describe_error(error, secret)) from None
            except openai.APIConnectionError as error:  # includes timeouts
                health.failed_to_connect(error, secret)
                failure = error
            except openai.APIStatusError as error:
                health.reached()
                failure = error
            except Exception as error:  # a 200 reply that is not JSON, not UTF-8, truncated or has no text
                health.reached()
                failure = error
            if not is_retryable(failure) or attempts > self.settings.max_retries:
                return ChatReply(None, describe_error(failure, secret), attempts, prompt_tokens, completion_tokens)
            await asyncio.sleep(self.backoff_seconds(failure, attempts))

    def backoff_seconds(self, error: Exception, attempt: int) -> float:
        """Exponential backoff with jitter, at least the server's Retry-After, capped."""
        exponential = self.settings.backoff * 2 ** (attempt - 1)
        jittered = exponential * (0.5 + self.jitter_rng.random() / 2)
        return min(max(jittered, retry_after_seconds(error)), MAX_BACKOFF_SECONDS)


def run_engines(work: Sequence[tuple[ChatEngine, Sequence[ChatRequest], Callable[[int, ChatReply], None]]]) -> None:
    """Run several engines (one per endpoint) concurrently until all are done or one raises.

    If one raises, the others are cancelled and the first error is re-raised.
    """

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(engine.run(requests, on_reply)) for engine, requests, on_reply in work]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run_all())
