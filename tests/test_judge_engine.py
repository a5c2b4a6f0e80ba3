"""judging.engine as a library: requests through the real openai SDK against the loopback judge server, with the
faults misbehaving OpenAI-compatible servers show."""

import pytest

from judge_server import BROKEN_BODIES, ConnectionDropper, JudgeServer, always, closed_port_url
from judging.engine import (ChatEngine, ChatRequest, EndpointHealth, EngineSettings, Endpoint, JudgeRejectedError,
                          JudgeUnreachableError, request_key, run_engines)

FAST = EngineSettings(concurrency=4, sleep_time=0, max_retries=2, timeout=0.5, backoff=0.01)
NO_TEXT_FAULTS = ["empty_choices", "no_choices", "null_content"]
NOT_A_COMPLETION_FAULTS = ["plain_text", "not_json", "bad_utf8", "truncated"]


@pytest.fixture(autouse=True)
def api_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "test-secret")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def question(index: int) -> ChatRequest:
    content = f"Response 1: answer [good] {index}\nEND OF RESPONSE 1\n\nResponse 2: other\nEND OF RESPONSE 2"
    return ChatRequest([{"role": "user", "content": f"[q{index}]"}, {"role": "user", "content": content}],
                       max_tokens=10, seed=0)


def complete(base_url: str, requests: list[ChatRequest], settings: EngineSettings = FAST,
             model: str = "judge") -> dict:
    """position -> reply, for one endpoint."""
    replies = {}
    engine = ChatEngine(Endpoint(model, base_url), settings)
    run_engines([(engine, requests, lambda position, reply: replies.__setitem__(position, reply))])
    return replies


def test_replies_arrive_by_position_with_their_usage():
    with JudgeServer() as server:
        replies = complete(server.base_url, [question(index) for index in range(5)])
    assert sorted(replies) == list(range(5))
    for position, reply in replies.items():
        assert (reply.text, reply.error, reply.attempts) == ("Response 1", None, 1)
        # usage is the server's word count: "[qN]" is 1 word, the second message 16 words; the reply 2
        assert (reply.prompt_tokens, reply.completion_tokens) == (17, 2)
    body = server.requests[0].body
    assert {key: body[key] for key in ("model", "temperature", "max_tokens", "seed")} == {
        "model": "judge", "temperature": 0, "max_tokens": 10, "seed": 0}


@pytest.mark.parametrize("fault", NO_TEXT_FAULTS + NOT_A_COMPLETION_FAULTS)
def test_a_200_reply_without_judge_text_is_retried(fault):
    assert fault in BROKEN_BODIES or fault == "null_content"
    with JudgeServer() as server:
        server.add_faults("[q1]", [fault])
        replies = complete(server.base_url, [question(0), question(1)])
    assert (replies[1].text, replies[1].error, replies[1].attempts) == ("Response 1", None, 2)
    assert replies[0].attempts == 1


@pytest.mark.parametrize("fault", NO_TEXT_FAULTS + NOT_A_COMPLETION_FAULTS)
def test_a_persistently_broken_reply_ends_as_an_error_not_an_exception(fault):
    with JudgeServer() as server:
        server.add_faults("[q0]", always(fault))
        replies = complete(server.base_url, [question(0), question(1)])
    assert replies[0].text is None and replies[0].attempts == FAST.max_retries + 1
    assert replies[0].error and "\n" not in replies[0].error
    assert replies[1].text == "Response 1"


def test_tokens_of_replies_without_text_are_still_counted():
    with JudgeServer() as server:
        server.add_faults("[q0]", ["null_content"])  # usage reports 17 prompt tokens and no completion
        [reply] = complete(server.base_url, [question(0)]).values()
    assert (reply.attempts, reply.prompt_tokens, reply.completion_tokens) == (2, 2 * 17, 2)


def test_a_hanging_judge_is_bounded_by_the_timeout():
    with JudgeServer() as server:
        server.add_faults("[q0]", ["hang"])
        [reply] = complete(server.base_url, [question(0)]).values()
    assert (reply.text, reply.attempts) == ("Response 1", 2)


def test_an_unreachable_endpoint_fails_fast_naming_its_url():
    url = closed_port_url()
    with pytest.raises(JudgeUnreachableError, match=f"judge endpoint {url}/? is unreachable"):
        complete(url, [question(index) for index in range(24)], EngineSettings(concurrency=1, sleep_time=0,
                                                                               backoff=0.01))


def test_a_dead_endpoint_is_given_up_after_a_few_connections():
    settings = EngineSettings(concurrency=2, sleep_time=0, max_retries=5, backoff=0.01, unreachable_after=3)
    with ConnectionDropper() as dropper, pytest.raises(JudgeUnreachableError):
        complete(dropper.base_url, [question(index) for index in range(24)], settings)
    # 24 requests with 6 attempts each would be 144 connections; the engine stops after 3 failures in a row,
    # plus what was already in flight (at most concurrency - 1 more).
    assert 3 <= dropper.connections <= 3 + settings.concurrency - 1


def test_connection_failures_after_the_endpoint_answered_are_ordinary_retries():
    health = EndpointHealth("http://example/v1", limit=2)
    health.reached()
    for _ in range(5):
        health.failed_to_connect(ConnectionError("reset"), "")  # no JudgeUnreachableError
    assert health.failures_in_a_row == 5


def test_a_refused_key_raises():
    with JudgeServer() as server:
        server.add_faults("", always("401"))
        with pytest.raises(JudgeRejectedError, match="401"):
            complete(server.base_url, [question(0)])


def test_several_endpoints_run_at_once_and_keep_their_replies_apart():
    with JudgeServer(latency=0.2) as first, JudgeServer(latency=0.2) as second:
        replies = {"a": {}, "b": {}}
        work = [(ChatEngine(Endpoint("a", first.base_url), FAST), [question(index) for index in range(4)],
                 lambda position, reply: replies["a"].__setitem__(position, reply)),
                (ChatEngine(Endpoint("b", second.base_url), FAST), [question(index) for index in range(2)],
                 lambda position, reply: replies["b"].__setitem__(position, reply))]
        run_engines(work)
    assert (sorted(replies["a"]), sorted(replies["b"])) == ([0, 1, 2, 3], [0, 1])
    assert {request.body["model"] for request in first.requests} == {"a"}
    assert len(second.requests) == 2
    # both ran concurrently: the second server's requests started before the first server's last one finished
    assert min(r.started_at for r in second.requests) < max(r.started_at for r in first.requests) + 0.2


def test_request_keys_name_the_content():
    base = question(0)
    same = ChatRequest([dict(message) for message in base.messages], 10, seed=0)
    assert request_key("m", base) == request_key("m", same)
    assert len(request_key("m", base)) == 64
    variants = [("other-model", base), ("m", question(1)), ("m", ChatRequest(base.messages, 10, seed=1)),
                ("m", ChatRequest(base.messages, 20, seed=0)), ("m", ChatRequest(base.messages, 10, seed=0,
                                                                                  template="graded"))]
    assert len({request_key(model, request) for model, request in variants} | {request_key("m", base)}) == 6


@pytest.mark.parametrize("spec, model, base_url", [
    ("gpt-4-0613", "gpt-4-0613", "http://default/v1"),
    ("llama@http://localhost:8000/v1", "llama", "http://localhost:8000/v1"),
    ("claude@20240229@https://host/v1", "claude@20240229", "https://host/v1"),  # an @ inside the model name
    ("name@notaurl", "name@notaurl", "http://default/v1"),
])
def test_endpoint_specs(spec, model, base_url):
    assert Endpoint.parse(spec, "http://default/v1") == Endpoint(model, base_url)
