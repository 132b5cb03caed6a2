"""The prompt cache: a generation that starts with an earlier prompt's tokens runs only the rest,
on every decoder (dense, the fused MoE graph, the budgeted pipeline, MLA's appended latent cache),
and gives exactly a cold run's tokens."""
import numpy as np
import pytest

import edge

CASES = [("llama", "int4", {}), ("mixtral", "int4", {}), ("mixtral", "int4", {"expert_capacity": 2}),
         ("deepseek_v3", "int4", {"expert_capacity": 2}), ("deepseek_v2", "fp32", {})]


@pytest.mark.parametrize("arch,quant,load", CASES)
def test_a_shared_prefix_runs_once_and_changes_nothing(arch, quant, load, tiny_bundle):
    b = tiny_bundle(arch, quant)
    rng = np.random.default_rng(3)
    prefix = [int(i) for i in rng.integers(0, 256, 70)]              # one whole 64-token piece and some
    m = edge.load(b, threads=1, context_length=128, **load)
    first = m.generate_ids(prefix + [1, 2, 3], max_new_tokens=8, temperature=0.0)
    assert m.last_stats.cached_tokens == 0
    turn = prefix + [1, 2, 3] + first + [7, 8]                       # the next turn: the whole exchange, and more
    warm = m.generate_ids(turn, max_new_tokens=12, temperature=0.0)
    assert m.last_stats.cached_tokens == 64
    again = m.generate_ids(turn, max_new_tokens=12, temperature=0.0, seed=1)  # same prompt again: same pieces
    assert m.last_stats.cached_tokens == 64 and again == warm
    cold = edge.load(b, threads=1, context_length=128, **load).generate_ids(turn, max_new_tokens=12, temperature=0.0)
    assert warm == cold
    other = m.generate_ids([9] + turn[1:], max_new_tokens=4, temperature=0.0)   # differs at the first token
    assert m.last_stats.cached_tokens == 0 and len(other) > 0


def test_using_the_decoder_directly_invalidates_the_cache(tiny_bundle):
    m = edge.load(tiny_bundle("llama", "int4"), threads=1, context_length=128)
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 256, 90)]
    want = m.generate_ids(ids, max_new_tokens=6, temperature=0.0)
    m.decoder.reset()
    m.decoder.forward([5] * 80)                       # overwrites the cached rows
    assert m.generate_ids(ids, max_new_tokens=6, temperature=0.0) == want
    assert m.last_stats.cached_tokens == 0
    m.logits([1, 2, 3])                                # scoring, too
    m.generate_ids(ids, max_new_tokens=6, temperature=0.0)
    assert m.last_stats.cached_tokens == 0


def test_chat_turns_reuse_the_conversation(tiny_bundle, chat_bundle):
    m = edge.load(chat_bundle, threads=1, context_length=128)
    system = {"role": "system", "content": "r " * 18}
    conv = [system, {"role": "user", "content": "hi"}]
    reply = m.chat(conv, max_new_tokens=8, temperature=0.0)
    conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
    warm = m.chat(conv, max_new_tokens=8, temperature=0.0)
    assert m.last_stats.cached_tokens >= 64
    assert warm == edge.load(chat_bundle, threads=1, context_length=128).chat(conv, max_new_tokens=8, temperature=0.0)
