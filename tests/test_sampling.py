import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ConfigError
from edge.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    p = SamplingParams(temperature=1.0, seed=7)
    a = [Sampler(p)(logits) for _ in range(3)]
    s = Sampler(p)
    b = [s(logits) for _ in range(50)]
    assert len(set(a)) == 1 and len(set(b)) > 5


def test_top_k_top_p_min_p_restrict_the_support():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    draw = lambda **kw: {Sampler(SamplingParams(temperature=1.0, seed=i, **kw))(logits) for i in range(300)}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.75) == {0, 1}
    assert draw(min_p=0.25) == {0, 1}
    assert draw() == {0, 1, 2, 3, 4}


def test_repetition_penalty_follows_hugging_face():
    logits = np.array([2.0, -2.0, 1.9], np.float32)
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    assert s(logits, np.array([0])) == 2          # 2.0 / 2 = 1.0 < 1.9
    assert s(np.array([-1.0, -2.0, -1.5], np.float32), np.array([0])) == 2   # -1 * 2 = -2 < -1.5


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-1),
                                dict(max_new_tokens=0), dict(repetition_penalty=0), dict(seed=-3),
                                dict(temperature=float("nan")), dict(stop=("",)), dict(max_new_tokens=2.5)])
def test_invalid_values_are_clear_errors(kw):
    with pytest.raises(ConfigError, match="invalid sampling parameter"):
        SamplingParams(**kw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=64), st.floats(0.05, 3), st.integers(0, 70),
       st.floats(0.01, 1.0), st.floats(0, 0.99), st.floats(0.5, 2.0), st.integers(0, 2**31))
def test_sampler_always_returns_a_valid_token(values, temperature, top_k, top_p, min_p, rep, seed):
    logits = np.array(values, np.float32)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=rep, seed=seed)
    t = Sampler(p)(logits, np.array([0]))
    assert 0 <= t < len(values)
    if top_k:
        penalised = logits.copy()
        penalised[0] = penalised[0] / rep if penalised[0] > 0 else penalised[0] * rep
        assert penalised[t] >= np.sort(penalised)[-min(top_k, len(values))]
