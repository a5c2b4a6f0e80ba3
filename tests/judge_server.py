"""A loopback OpenAI-compatible judge server for tests and benchmarks.

`JudgeServer` serves `POST /v1/chat/completions` on 127.0.0.1 (OS-chosen port) from a background
thread, in the OpenAI chat-completion response schema, so `compare.py` can be driven through the
real `openai` SDK without any network.

Verdicts are deterministic: the judge names the shown response whose text contains `WINNER_MARKER`,
and answers `TIE_REPLY` (which names no response) when neither or both do. Faults are planned per
conversation: `add_faults(text, faults)` makes successive requests whose messages contain `text`
take the given faults in turn, then behave normally. Fault kinds:

* ``"429"``, ``"500"``, ``"401"``: answer with that HTTP status and an OpenAI-style error body.
* ``"echo400"``: answer 400 with the request's Authorization header in the error message (to check
  that clients never write secrets they are sent back).
* ``"slow"``: wait `slow_seconds` before answering normally (to trip a client timeout).
* ``"unparsable"``: answer ``UNPARSABLE_REPLY``, which names no response.
* ``"bad_label"``: answer ``"Response Z"``, a label that was not shown.

Pass ``always("500")`` as faults for a conversation that always fails.
"""

import itertools
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WINNER_MARKER = "[good]"
TIE_REPLY = "Both are equally fine."
UNPARSABLE_REPLY = "I cannot decide."
BAD_LABEL_REPLY = "Response Z"
COMPLETIONS_PATH = "/v1/chat/completions"
# The blocks compare.py shows the judge: "Response {label}: {text}\nEND OF RESPONSE {label}".
SHOWN_RESPONSE = re.compile(r"Response (.): (.*?)\nEND OF RESPONSE \1", re.DOTALL)
ERROR_STATUSES = {"401": 401, "429": 429, "500": 500}


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


def judge_reply(messages: list[dict]) -> str:
    """The deterministic verdict: name the shown response that carries `WINNER_MARKER`."""
    shown = SHOWN_RESPONSE.findall(messages[-1]["content"])
    winners = [label for label, text in shown if WINNER_MARKER in text]
    return f"Response {winners[0]}" if len(winners) == 1 else TIE_REPLY


def completion_body(model: str, content: str) -> dict:
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
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
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
    """

    def __init__(self, latency: float = 0.0, slow_seconds: float = 1.0):
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.requests: list[ReceivedRequest] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._fault_plans: list[tuple[str, Iterator[str]]] = []
        self._lock = threading.Lock()
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
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def add_faults(self, text: str, faults: Iterable[str]) -> None:
        """Give successive requests whose messages contain `text` these faults, in order."""
        with self._lock:
            self._fault_plans.append((text, iter(faults)))

    def requests_containing(self, text: str) -> list[ReceivedRequest]:
        """The requests received so far whose messages contain `text`."""
        with self._lock:
            return [request for request in self.requests if text in request.text]

    def _record(self, body: dict, authorization: str) -> ReceivedRequest:
        """Log a request, take its planned fault and count it as in flight."""
        with self._lock:
            request = ReceivedRequest(body, authorization, time.monotonic(), None)
            for text, faults in self._fault_plans:
                if text in request.text:
                    request.fault = next(faults, None)
                    break
            self.requests.append(request)
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            return request

    def _finish(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _answer(self, request: ReceivedRequest) -> tuple[int, dict]:
        """Status and JSON body for a recorded request, after its latency."""
        time.sleep(self.latency + (self.slow_seconds if request.fault == "slow" else 0.0))
        model = request.body.get("model", "")
        if request.fault in ERROR_STATUSES:
            return ERROR_STATUSES[request.fault], error_body(f"injected {request.fault}")
        if request.fault == "echo400":
            return 400, error_body(f"bad request with Authorization {request.authorization}")
        replies = {"unparsable": UNPARSABLE_REPLY, "bad_label": BAD_LABEL_REPLY}
        content = replies.get(request.fault) or judge_reply(request.body["messages"])
        return 200, completion_body(model, content)

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
                    self._send(404, error_body(f"no route {self.path}"))
                    return
                request = server._record(body, self.headers.get("Authorization", ""))
                try:
                    self._send(*server._answer(request))
                finally:
                    server._finish()

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before the answer came

            def log_message(self, format: str, *args) -> None:
                pass  # keep test output clean

        return Handler


def always(fault: str) -> Iterator[str]:
    """A fault plan that never recovers."""
    return itertools.repeat(fault)
