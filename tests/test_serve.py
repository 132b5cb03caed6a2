"""`edge serve` on localhost, driven by the official openai client: chat, streaming, completions,
JSON-schema output and tool calls that validate (on the real SmolLM2), OpenAI-shaped errors, the
API key, context overflow, disconnects that cancel, and the full queue's 503."""
import contextlib
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(bundle, *args, key="unused"):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "edge", "serve", str(bundle), "--port", str(port), "--threads", "1",
                          "--name", "m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if p.poll() is not None:
                raise AssertionError(f"edge serve exited: {p.stderr.read()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0), base
    finally:
        p.terminate()
        p.wait(20)


@pytest.fixture(scope="module")
def tiny(chat_bundle):
    with served(chat_bundle, "--context", "128") as s:
        yield s


@pytest.fixture(scope="module")
def smollm2(gguf_bundles):
    with served(gguf_bundles["int8"], "--context", "1024", "--queue", "1") as s:
        yield s


def test_health_and_models(tiny):
    client, base = tiny
    assert [m.id for m in client.models.list()] == ["m"]
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_chat_streaming_and_not_agree(tiny):
    client, _ = tiny
    msgs = [{"role": "system", "content": "be brief and kind. " * 3}, {"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c.message.content                   # the second ran from the prompt cache: same tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_completions(tiny):
    client, _ = tiny
    r = client.completions.create(model="m", prompt="abc def", max_tokens=5, temperature=0, seed=3)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 5
    s = list(client.completions.create(model="m", prompt="abc def", max_tokens=5, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in s) == r.choices[0].text


def test_bad_requests_get_openai_errors(tiny):
    client, base = tiny
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=msgs)
    for bad, param in ((dict(temperature=5), "temperature"), (dict(n=2), "n"), (dict(max_tokens=500), "max_tokens"),
                       (dict(logprobs=True), "logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=msgs, **bad)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert r.status_code == 413
    r = httpx.post(base + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="m", messages=msgs, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}], tool_choice={"type": "function", "function": {"name": "g"}})


def test_a_long_conversation_drops_its_oldest_turns(tiny):
    client, base = tiny
    turns = [{"role": "system", "content": "sys"}]
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    turns.append({"role": "user", "content": "last"})
    r = client.chat.completions.with_raw_response.create(model="m", messages=turns, max_tokens=8)
    assert r.status_code == 200 and int(r.headers["x-edge-dropped-messages"]) > 0
    with pytest.raises(openai.BadRequestError, match=r"needs \d+ prompt tokens and 8 for the reply, but the context "
                                                     r"window is 128"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y" * 300}], max_tokens=8)


def test_the_api_key_is_required_when_set(chat_bundle):
    with served(chat_bundle, "--context", "128", "--api-key", "s3cret", key="wrong") as (client, base):
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=2).usage


SCHEMAS = [
    {"type": "object", "properties": {"action": {"enum": ["pick", "place", "wait"]},
                                      "speed": {"type": "number", "minimum": 0, "maximum": 1}},
     "required": ["action", "speed"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                      "y": {"type": "integer", "minimum": -5, "maximum": 5}},
     "required": ["x", "y"], "additionalProperties": False},
    {"type": "object", "properties": {"target": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20}, "distance_m": {"type": "number", "exclusiveMinimum": 0}},
        "required": ["name", "distance_m"], "additionalProperties": False}, "urgent": {"type": "boolean"}},
     "required": ["target", "urgent"], "additionalProperties": False},
    {"type": "object", "properties": {"steps": {"type": "array", "minItems": 1, "maxItems": 4,
                                                "items": {"type": "string", "maxLength": 30}}},
     "required": ["steps"], "additionalProperties": False},
    {"type": "object", "properties": {"joints": {"type": "array", "minItems": 2, "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 6},
                                         "angle": {"type": "number", "minimum": -180, "maximum": 180}},
        "required": ["id", "angle"], "additionalProperties": False}}},
     "required": ["joints"], "additionalProperties": False},
]
ASKS = ["Pick up the red cup slowly.", "Move one step left and two up.", "A person is 3 metres away, is it urgent?",
        "List the steps to open a door.", "Set the elbow to 30 degrees and the wrist to -45."]


def test_schema_outputs_validate(smollm2):
    """Bar: 50 requests over 5 schemas (enums, bounded numbers, nested objects, arrays) all validate.
    (SmolLM2's recommended sampling; at temperature 0.8 it can write a number's digits until
    max_tokens, which no JSON grammar forbids.)"""
    client, _ = smollm2
    for i in range(50):
        k = i % 5
        r = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": ASKS[k] + f" Answer in JSON. (request {i})"}],
            max_tokens=160, temperature=0.2, top_p=0.9, seed=i, response_format={"type": "json_schema", "json_schema": {"name": f"s{k}",
                                                                                             "schema": SCHEMAS[k]}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMAS[k])
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Describe a cat in JSON with "
                                                             "its name and age."}], max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)


TOOLS = [{"type": "function", "function": {"name": "move_arm", "description": "Move the arm to a position in metres",
                                           "parameters": {"type": "object", "properties": {
                                               "x": {"type": "number"}, "y": {"type": "number"}},
                                               "required": ["x", "y"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "say", "description": "Speak a sentence aloud",
                                           "parameters": {"type": "object", "properties": {
                                               "text": {"type": "string", "maxLength": 80}},
                                               "required": ["text"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "say"}}])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_name_a_function_with_valid_arguments(smollm2, choice, stream):
    client, _ = smollm2
    msgs = [{"role": "user", "content": "Move the arm to x=0.2, y=0.5 and tell me when done."}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice=choice, max_tokens=80,
                                       stream=stream)
    if stream:
        chunks = list(r)
        calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
    else:
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
    assert finish == "tool_calls" and len(calls) == 1 and calls[0].id.startswith("call_")
    f = calls[0].function
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert f.name in spec and (isinstance(choice, str) or f.name == "say")
    jsonschema.validate(json.loads(f.arguments), spec[f.name])
    # the tool's answer goes back as a message, and the conversation goes on in text
    msgs += [{"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].id, "type": "function",
                                                                     "function": {"name": f.name, "arguments": f.arguments}}]},
             {"role": "tool", "tool_call_id": calls[0].id, "content": "done"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert isinstance(r.choices[0].message.content, str) and not r.choices[0].message.tool_calls


def _health(base):
    return httpx.get(base + "/health").json()


def _until(base, ok, seconds=20.0):
    end = time.perf_counter() + seconds
    while not ok(_health(base)):
        assert time.perf_counter() < end, _health(base)
        time.sleep(0.02)


def test_a_disconnect_cancels_and_a_full_queue_is_503(smollm2):
    """--queue 1: one generation runs, one waits, the next is refused with Retry-After; a client that
    closes its stream ends its generation at the next token."""
    client, base = smollm2
    long = dict(model="m", messages=[{"role": "user", "content": "Write a long story about a robot."}],
                max_tokens=600, temperature=0.7, seed=1)
    before = _health(base)
    first = client.chat.completions.create(stream=True, **long)
    next(iter(first))
    _until(base, lambda h: h["running"] == 1)                            # it runs
    with httpx.Client(timeout=30) as h:
        with h.stream("POST", base + "/v1/chat/completions", json={**long, "stream": True}) as second:
            assert second.status_code == 200
            _until(base, lambda h: h["waiting"] == 1)                    # it waits
            r = h.post(base + "/v1/chat/completions", json=long)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
            first.close()                                                # the first client leaves
            t0 = time.perf_counter()
            lines = second.iter_lines()
            while '"delta": {"content"' not in next(lines):              # the waiting one decodes
                pass
            started = time.perf_counter() - t0
        # ... and leaves in its turn
    for _ in range(100):
        h = _health(base)
        if h["running"] == 0 and h["served"] >= before["served"] + 2:
            break
        time.sleep(0.05)
    assert h["running"] == 0 and h["cancelled"] >= before["cancelled"] + 2, h
    assert h["pieces_after_leaving_max"] <= 1, h                         # at most the step in flight
    assert started < 5.0                                                 # not after the first's 600 tokens


def test_python_api_json_schema_and_tools(chat_bundle):
    import edge
    m = edge.load(chat_bundle, threads=1, context_length=128)
    schema = {"type": "object", "properties": {"go": {"enum": ["left", "right"]}, "n": {"type": "integer",
                                                                                           "minimum": 1, "maximum": 9}},
              "required": ["go", "n"], "additionalProperties": False}
    for seed in range(5):
        out = m.generate("abc", json_schema=schema, max_new_tokens=40, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(out), schema)
    with pytest.raises(edge.ConfigError, match="json_schema"):
        m.generate("abc", json_schema={"type": "object", "properties": {"a": {"type": "nonsense"}}})
    assert np.isfinite(m.logits([1, 2, 3])).all()


def test_python_api_tool_calls(gguf_bundles):
    import edge
    m = edge.load(gguf_bundles["int8"], threads=2, context_length=512)
    msgs = [{"role": "user", "content": "Say hello to the visitors."}]
    c = m.chat(msgs, tools=TOOLS, tool_choice="required", max_new_tokens=60)
    assert c.finish_reason == "tool_calls" and c.tool_calls[0].name in ("move_arm", "say")
    spec = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    jsonschema.validate(c.tool_calls[0].arguments, spec[c.tool_calls[0].name])
    with pytest.raises(edge.ConfigError, match="does not stream"):
        m.chat(msgs, tools=TOOLS, stream=True)
