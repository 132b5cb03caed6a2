"""Speculative decoding: prompt lookup and a draft model give plain greedy decoding's tokens (fp32,
where a block and one-token steps round alike), several tokens per forward on repetitive text,
the sampling rule keeps the model's distribution, and a draft with another tokenizer is refused."""
from types import SimpleNamespace

import numpy as np
import pytest

import edge
from edge.sampling import Sampler, SamplingParams
from edge.speculative import PromptLookup, accept

REPEAT = [int(i) for i in np.random.default_rng(7).integers(0, 250, 12)] * 4     # a prompt that repeats itself


@pytest.mark.parametrize("arch,load", [("llama", {}), ("mixtral", {}), ("mixtral", {"expert_capacity": 2}),
                                       ("deepseek_v3", {"expert_capacity": 2})])
def test_prompt_lookup_gives_greedy_tokens(arch, load, tiny_bundle):
    b = tiny_bundle(arch)
    plain = edge.load(b, threads=1, context_length=128, **load)
    fast = edge.load(b, threads=1, context_length=128, prompt_lookup=3, draft_tokens=6, **load)
    for prompt in (REPEAT, REPEAT[:20] + [3, 1, 4, 1, 5]):
        want = plain.generate_ids(prompt, max_new_tokens=40, temperature=0.0)
        assert fast.generate_ids(prompt, max_new_tokens=40, temperature=0.0) == want
    s = fast.last_stats
    assert s.accepted > 0 and s.tokens_per_forward > 1


def test_a_perfect_draft_is_always_accepted(tiny_bundle):
    b = tiny_bundle("llama")
    plain = edge.load(b, threads=1, context_length=128)
    fast = edge.load(b, threads=1, context_length=128, draft=edge.load(b, threads=1, context_length=128),
                     draft_tokens=4)
    prompt = [5, 17, 99, 3, 250, 7]
    want = plain.generate_ids(prompt, max_new_tokens=30, temperature=0.0)
    assert fast.generate_ids(prompt, max_new_tokens=30, temperature=0.0) == want
    s = fast.last_stats
    assert s.accepted == s.drafted > 0 and s.tokens_per_forward > 1.8    # (a random model is never confident: 1 guess)
    again = fast.generate_ids(prompt[:4] + [1, 2], max_new_tokens=10, temperature=0.0)   # the draft's cache follows
    assert again == plain.generate_ids(prompt[:4] + [1, 2], max_new_tokens=10, temperature=0.0)


def test_a_draft_must_share_the_tokenizer(tiny_bundle):
    from edge.speculative import DraftModel
    target = edge.load(tiny_bundle("llama"), threads=1, context_length=64)
    other = SimpleNamespace(text=SimpleNamespace(tok=SimpleNamespace(get_vocab=lambda with_added_tokens: {"a": 0})),
                            decoder=None)
    with pytest.raises(edge.ConfigError, match="tokenizer differs"):
        DraftModel(other, target.text)
    with pytest.raises(edge.ConfigError, match="choose one"):
        edge.load(tiny_bundle("llama"), draft=target, prompt_lookup=2)


@pytest.mark.parametrize("guess", [0, 3, 7])
def test_the_acceptance_rule_keeps_the_distribution(guess):
    """Whatever is guessed, the token that comes out (the guess kept, or the replacement) is
    distributed as plain sampling from p: 40,000 draws against p, within sampling noise."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -3.0], np.float32)
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=6))
    idx, probs = sampler.distribution(logits)
    p = np.zeros(8)
    p[idx] = probs
    rng = np.random.default_rng(0)
    counts = np.zeros(8)
    for _ in range(40000):
        kept, instead = accept(logits, guess, sampler, rng)
        counts[guess if kept else instead] += 1
    assert np.abs(counts / counts.sum() - p).max() < 0.01, (counts / counts.sum(), p)


def test_prompt_lookup_finds_the_latest_match():
    g = PromptLookup(max_ngram=2, max_tokens=4)
    seq = [1, 2, 3, 4, 5, 1, 2, 9, 9, 1, 2]
    g.start(seq)
    assert g.propose(seq, 3) == [9, 9, 1]                     # "1 2" last seen before "9 9"
    seq += [9]
    assert g.propose(seq, 3) == [9, 1, 2]                     # "2 9" -> what followed it


def test_the_cli_reports_guesses(tiny_bundle):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "edge", "run", str(tiny_bundle("llama")), "ab ab ab ab ab ab ab ab",
                        "-n", "24", "--temperature", "0", "--prompt-lookup", "2", "--stats", "--threads", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "guesses kept" in r.stderr and "tokens a forward" in r.stderr
