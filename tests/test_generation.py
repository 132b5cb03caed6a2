"""The Python API on a tiny model: generate / stream / chat, stops, limits, errors, threads."""
import threading
import time

import numpy as np
import pytest

import edge
from edge.errors import ConfigError, ContextError

@pytest.fixture(scope="module")
def model(tiny_bundle):
    return edge.load(tiny_bundle("llama"), threads=1, context_length=64)


def test_stream_equals_generate(model):
    pieces = list(model.stream("hello", max_new_tokens=12))
    assert "".join(pieces) == model.generate("hello", max_new_tokens=12)
    assert model.last_stats.generated_tokens == 12 and model.last_stats.finish_reason in ("length", "eos")


def test_greedy_tokens_match_manual_loop(model):
    ids = model.encode("abc")
    got = model.generate_ids(ids, max_new_tokens=10)
    d = model.decoder
    d.reset()
    t = int(np.argmax(d.forward(ids)[-1]))
    want = [t]
    for _ in range(9):
        t = int(np.argmax(d.forward([t])))
        want.append(t)
    d.reset()
    eos = set(model.manifest.tokenizer.eos_token_ids)
    cut = next((i for i, x in enumerate(want) if x in eos), len(want))
    assert got == want[:cut]


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("x", max_new_tokens=10, temperature=1.0, seed=3)
    b = model.generate("x", max_new_tokens=10, temperature=1.0, seed=3)
    assert a == b


def test_stop_string_ends_generation(model):
    full = model.generate("hello", max_new_tokens=20)
    if len(full) < 4:
        pytest.skip("tiny model produced too little text")
    stop = full[2:4]
    out = model.generate("hello", max_new_tokens=20, stop=[stop])
    assert out == full[:full.index(stop)] and model.last_stats.finish_reason == "stop"


def test_prompt_over_context_is_a_clear_error(model):
    with pytest.raises(ContextError, match="context window is 64"):
        model.generate("x" * 200)


def test_generation_stops_at_the_context_end(model):
    model.generate_ids(list(range(60)), max_new_tokens=50)
    assert model.last_stats.finish_reason in ("context", "eos")
    assert model.last_stats.generated_tokens <= 5


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=2.0), dict(nonsense=1)])
def test_bad_sampling_arguments(model, bad):
    with pytest.raises(ConfigError):
        model.generate("x", **bad)


def test_empty_prompt(model):
    with pytest.raises(ConfigError, match="empty"):
        model.generate("")


def test_closing_a_stream_frees_the_model(model):
    it = model.stream("hello", max_new_tokens=30)
    next(it)
    it.close()
    assert model.last_stats.finish_reason == "cancelled" and model.decoder.position == 0
    assert model.generate("hello", max_new_tokens=3) is not None


def test_a_stop_event_cancels_from_another_thread(model):
    cancel = threading.Event()
    pieces = []
    for piece in model.stream("hello", max_new_tokens=50, cancel=cancel, temperature=0):
        pieces.append(piece)
        if len(pieces) == 3:
            threading.Thread(target=cancel.set).start()
            time.sleep(0.05)
    assert len(pieces) == 3 and model.last_stats.finish_reason == "cancelled" and model.decoder.position == 0
    assert model.generate_ids([1, 2, 3], max_new_tokens=5, cancel=cancel) == []    # already set: nothing runs
    assert model.generate("hello", max_new_tokens=3) is not None


def test_chat_uses_the_template(chat_bundle):
    m = edge.load(chat_bundle, threads=1, context_length=64)
    msgs = [{"role": "user", "content": "hi"}]
    assert m.text.render_chat(msgs) == "<s>user: hi\n<s>assistant:"
    assert m.chat(msgs, max_new_tokens=5) == m.generate("<s>user: hi\n<s>assistant:", max_new_tokens=5)
    with pytest.raises(ConfigError, match="messages"):
        m.chat([{"role": "user"}])


def test_threads_share_one_model_safely(model):
    prompts = [f"prompt {i}" for i in range(8)]
    want = [model.generate(p, max_new_tokens=8) for p in prompts]
    got = [None] * 8

    def work(i):
        got[i] = model.generate(prompts[i], max_new_tokens=8)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == want
