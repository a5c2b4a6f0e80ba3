"""A loopback OpenAI-compatible judge server for tests and benchmarks.

`JudgeServer` serves `POST /v1/chat/completions` on 127.0.0.1 (OS-chosen port) from a background thread, in the
OpenAI chat-completion response schema, so `compare.py` can be driven through the real `openai` SDK without any
network.

Verdicts are deterministic and depend on the requested model: `judges` maps a model name to a reply function of
the messages (default `marker_judge`, which names the shown response whose text contains `WINNER_MARKER`). Usage
is reported as whitespace-separated words: `prompt_tokens` of all message contents, `completion_tokens` of the
reply.

Faults are planned per conversation: `add_faults(text, faults)` makes successive requests whose messages contain
`text` (and, with `model`, ask for that model) take the given faults in turn, then behave normally. Fault kinds:

* ``"429"``, ``"500"``, ``"401"``: answer with that HTTP status and an OpenAI-style error body.
* ``"echo400"``: answer 400 with the request's Authorization header in the error message (to check that
  clients never write secrets they are sent back).
* ``"slow"``: wait `slow_seconds` before answering normally (to trip a client timeout).
* ``"hang"``: never answer (until the server stops); only a client timeout ends the request.
* ``"unparsable"``: answer ``UNPARSABLE_REPLY``, which names no response.
* ``"bad_label"``: answer ``"Response Z"``, a label that was not shown.
* 200 replies without judge text: ``"empty_choices"`` (``choices: []``), ``"no_choices"`` (no ``choices``
  key), ``"null_content"`` (``content: null``).
* 200 replies that are not a chat completion: ``"plain_text"`` (a ``text/plain`` body), ``"not_json"``,
  ``"bad_utf8"`` (invalid UTF-8) and ``"truncated"`` (JSON cut short), all labelled ``application/json``.

Pass ``always("500")`` as faults for a conversation that always fails. `closed_port_url` and `ConnectionDropper`
stand in for endpoints that cannot be reached.
"""

import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WINNER_MARKER = "[good]"
STRONG_MARKER = "[great]"
TIE_REPLY = "Both are equally fine."
UNPARSABLE_REPLY = "I cannot decide."
BAD_LABEL_REPLY = "Response Z"
COMPLETIONS_PATH = "/v1/chat/completions"
# The blocks compare.py shows the judge: "Response {label}: {text}\nEND OF RESPONSE {label}".
SHOWN_RESPONSE = re.compile(r"Response (.): (.*?)\nEND OF RESPONSE \1", re.DOTALL)
ERROR_STATUSES = {"401": 401, "429": 429, "500": 500}
REPLY_FAULTS = {"unparsable": UNPARSABLE_REPLY, "bad_label": BAD_LABEL_REPLY}
# Bodies of 200 replies that carry no judge text, or are no chat completion at all: (content type, bytes).
BROKEN_BODIES = {
    "empty_choices": ("application/json", json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                      "model": "m", "choices": []}).encode()),
    "no_choices": ("application/json", json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                   "model": "m"}).encode()),
    "plain_text": ("text/plain", b"upstream hiccup, try again"),
    "not_json": ("application/json", b"upstream hiccup, try again"),
    "bad_utf8": ("application/json", b'{"id": "x\xff\xfe", "choices": []}'),
    "truncated": ("application/json", b'{"id": "x", "object": "chat.completion", "choices": [{"index": 0, "mes'),
}


@dataclass
class ReceivedRequest:
    """One request as the server saw it."""

    body: dict
    authorization: str
    started_at: float
    fault: str | None

    @property
    def text(self) -> str:
        """All message contents joined, for matching conversations."""
        return "\n".join(message["content"] for message in self.body["messages"])


def shown_responses(messages: list[dict]) -> list[tuple[str, str]]:
    """(label, text) of the responses shown in the judge's last message, in order."""
    return SHOWN_RESPONSE.findall(messages[-1]["content"])


def marker_judge(messages: list[dict]) -> str:
    """The binary verdict: name the shown response that carries `WINNER_MARKER`; a tie if none or both do."""
    winners = [label for label, text in shown_responses(messages) if WINNER_MARKER in text]
    return f"Response {winners[0]}" if len(winners) == 1 else TIE_REPLY


def first_shown_judge(messages: list[dict]) -> str:
    """A judge with total position bias: it always picks the response shown first."""
    return f"Response {shown_responses(messages)[0][0]}"


def contrarian_judge(messages: list[dict]) -> str:
    """Disagrees with `marker_judge` whenever that one picks a response."""
    shown = shown_responses(messages)
    losers = [label for label, text in shown if WINNER_MARKER not in text]
    return f"Response {losers[0]}" if len(losers) == 1 else TIE_REPLY


def graded_marker_judge(messages: list[dict]) -> str:
    """The graded verdict `[[a>b]]`: a response scores 2 with `STRONG_MARKER`, 1 with `WINNER_MARKER`, else 0;
    a difference of 2 is "much better"."""
    (first, first_text), (second, second_text) = shown_responses(messages)
    score = lambda text: 2 if STRONG_MARKER in text else 1 if WINNER_MARKER in text else 0  # noqa: E731
    difference = score(first_text) - score(second_text)
    relation = {2: ">>", 1: ">", 0: "="}[abs(difference)]
    return f"Verdict: [[{first}{relation}{second}]]" if difference >= 0 else f"Verdict: [[{second}{relation}{first}]]"


def word_count(text: str) -> int:
    return len(text.split())


def completion_body(model: str, content: str | None, prompt_tokens: int) -> dict:
    """A chat-completion response in the OpenAI schema."""
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": word_count(content or ""),
                  "total_tokens": prompt_tokens + word_count(content or "")},
    }


def error_body(message: str) -> dict:
    """An error response in the OpenAI schema."""
    return {"error": {"message": message, "type": "loopback_error", "param": None, "code": None}}


class LoopbackHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server whose listen backlog takes a burst of concurrent connects."""

    # The default backlog of 5 drops the SYNs of a larger burst, and the client retries 1 s later.
    request_queue_size = 128
    daemon_threads = True


class JudgeServer:
    """Threaded loopback judge; use as a context manager or call `start`/`stop`.

    Args:
        latency: seconds every request waits before it is answered.
        slow_seconds: extra wait of the ``"slow"`` fault.
        judges: model name -> reply function of the messages; other models get `marker_judge`.
    """

    def __init__(self, latency: float = 0.0, slow_seconds: float = 1.0,
                 judges: dict[str, Callable[[list[dict]], str]] | None = None):
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.judges = judges or {}
        self.requests: list[ReceivedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._fault_plans: list[tuple[str, str | None, Iterator[str]]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = LoopbackHTTPServer(("127.0.0.1", 0), self._handler_class())
        # A short poll interval makes `stop` quick (the default 0.5 s would dominate test time).
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client as `base_url`."""
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "JudgeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging requests
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add_faults(self, text: str, faults: Iterable[str], model: str | None = None) -> None:
        """Give successive requests whose messages contain `text` (for `model`, if given) these faults, in order."""
        with self._lock:
            self._fault_plans.append((text, model, iter(faults)))

    def requests_containing(self, text: str, model: str | None = None) -> list[ReceivedRequest]:
        """The requests received so far whose messages contain `text` (and that asked for `model`)."""
        with self._lock:
            return [request for request in self.requests
                    if text in request.text and model in (None, request.body.get("model"))]

    def _record(self, body: dict, authorization: str) -> ReceivedRequest:
        """Log a request, take its planned fault and count it as in flight."""
        with self._lock:
            request = ReceivedRequest(body, authorization, time.monotonic(), None)
            for text, model, faults in self._fault_plans:
                if text in request.text and model in (None, body.get("model")):
                    request.fault = next(faults, None)
                    break
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return request

    def _finish(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _answer(self, request: ReceivedRequest) -> tuple[int, str, bytes]:
        """Status, content type and body for a recorded request, after its latency."""
        time.sleep(self.latency + (self.slow_seconds if request.fault == "slow" else 0.0))
        if request.fault == "hang":
            self._stopping.wait()
        model = request.body.get("model", "")
        if request.fault in ERROR_STATUSES:
            return ERROR_STATUSES[request.fault], "application/json", json_bytes(
                error_body(f"injected {request.fault}"))
        if request.fault == "echo400":
            return 400, "application/json", json_bytes(
                error_body(f"bad request with Authorization {request.authorization}"))
        if request.fault in BROKEN_BODIES:
            return 200, *BROKEN_BODIES[request.fault]
        messages = request.body["messages"]
        content = None if request.fault == "null_content" else (
            REPLY_FAULTS.get(request.fault) or self.judges.get(model, marker_judge)(messages))
        prompt_tokens = sum(word_count(message["content"]) for message in messages)
        return 200, "application/json", json_bytes(completion_body(model, content, prompt_tokens))

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keeps connections alive, as a real endpoint does for a pooled client.
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle's algorithm on, the client's
            # delayed ACK adds about 40 ms to every reply.
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                if self.path != COMPLETIONS_PATH:
                    self._send(404, "application/json", json_bytes(error_body(f"no route {self.path}")))
                    return
                request = server._record(body, self.headers.get("Authorization", ""))
                try:
                    self._send(*server._answer(request))
                finally:
                    server._finish()

            def _send(self, status: int, content_type: str, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the answer came

            def log_message(self, format: str, *args) -> None:
                pass  # keep test output clean

        return Handler


def json_bytes(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def always(fault: str) -> Iterator[str]:
    """A fault plan that never recovers."""
    return itertools.repeat(fault)


def closed_port_url() -> str:
    """The base URL of a loopback port nothing listens on: every connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


class ConnectionDropper:
    """A loopback TCP endpoint that accepts each connection and closes it at once, counting them.

    To the client every request is a failed connection, as with a dead endpoint, but the attempts can be counted.
    """

    def __init__(self):
        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def __enter__(self) -> "ConnectionDropper":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close()
