"""Generation against transformers' greedy generate, and the sampler, stops, thinking budget and prefill step."""

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import TINY_DENSE, TINY_MOE, write_hf_checkpoint
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from qwenmlx.cache import make_cache
from qwenmlx.checkpoint import load, load_model
from qwenmlx.config import config_from_dict
from qwenmlx.errors import QwenMLXError
from qwenmlx.generate import (
    THINKING_BUDGET_TEXT,
    Sampling,
    Stats,
    apply_penalties,
    check_generation,
    default_sampling,
    generate_tokens,
    make_sampler,
    prefill,
    prefill_step_for,
    stream_generate,
)
from qwenmlx.model import Model

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
NEW_TOKENS = 60
# Two logits closer than this are a tie as far as float32 arithmetic in another order can tell.
NEAR_TIE = 1e-4


@pytest.fixture(scope="session")
def generation_dir(checkpoint_dir, tmp_path_factory):
    """Checkpoints by name: the shared moe/dense ones, plus YaRN variants written here."""
    yarn = {"moe-yarn": dict(TINY_MOE, rope_scaling=YARN), "dense-yarn": dict(TINY_DENSE, rope_scaling=YARN)}
    written = {}

    def get(name: str):
        if name not in yarn:
            return checkpoint_dir(name)
        if name not in written:
            written[name] = write_hf_checkpoint(tmp_path_factory.mktemp(name), yarn[name])
        return written[name]

    return get


def prompt_ids(n: int = 24, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 151_000, n).tolist()


@pytest.mark.parametrize("variant", ["moe", "dense", "moe-yarn", "dense-yarn"])
def test_greedy_generation_equals_transformers_generate(generation_dir, variant):
    model_dir = generation_dir(variant)
    prompt = prompt_ids()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                           return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt):].tolist()
    scores = torch.stack(out.scores)[:, 0]  # the logits transformers chose each token from
    model, _ = load_model(model_dir)
    # A prefill step of 7 splits the prompt into uneven chunks.
    got = [t for t, _ in generate_tokens(model, prompt, max_tokens=NEW_TOKENS, prefill_step=7)]
    # The same tokens up to the first near tie in transformers' logits, if random weights make one: there
    # either token is right, and the two runs may go separate ways after it.
    best, second = scores.topk(2).values.T
    tie = next((i for i in range(NEW_TOKENS) if best[i] - second[i] < NEAR_TIE), NEW_TOKENS)
    assert got[:tie] == expected[:tie]
    assert tie == NEW_TOKENS or scores[tie, got[tie]] >= best[tie] - NEAR_TIE


@pytest.fixture(scope="session")
def moe_model(moe_dir):
    return load(moe_dir)


def greedy(model, prompt, n, **kwargs):
    return [t for t, _ in generate_tokens(model, prompt, max_tokens=n, **kwargs)]


def test_stops_at_a_stop_token_and_reports_why(moe_model):
    model, _ = moe_model
    prompt = prompt_ids()
    tokens = greedy(model, prompt, 20)
    stop = tokens[5]
    cut = tokens.index(stop) + 1
    stats = Stats()
    assert [t for t, _ in generate_tokens(model, prompt, max_tokens=20, stop_ids={stop}, stats=stats)] == tokens[:cut]
    assert stats.finish_reason == "stop" and stats.generated_tokens == cut and stats.prompt_tokens == len(prompt)
    stats = Stats()
    assert len([t for t, _ in generate_tokens(model, prompt, max_tokens=7, stats=stats)]) == 7
    assert stats.finish_reason == "length"


@pytest.mark.parametrize("stop_after", [1, 4])
def test_cache_holds_prompt_and_all_but_the_last_token_when_the_caller_stops_early(moe_model, stop_after):
    model, _ = moe_model
    prompt = prompt_ids()
    cache = make_cache(model)
    run = generate_tokens(model, prompt, cache=cache, max_tokens=50)
    seen = [next(run)[0] for _ in range(stop_after)]
    run.close()
    assert cache[0].offset == len(prompt) + stop_after - 1
    # Continuing from that cache with the last token gives what an uninterrupted run gives.
    resumed = greedy(model, seen[-1:], 5, cache=cache)
    assert resumed == greedy(model, prompt, stop_after + 5)[stop_after:]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(moe_model):
    model, _ = moe_model
    prompt = prompt_ids()
    sampling = Sampling(temperature=1.0, top_p=0.95, top_k=50, min_p=0.01, seed=3)
    first, second = greedy(model, prompt, 20, sampling=sampling), greedy(model, prompt, 20, sampling=sampling)
    assert first == second
    assert greedy(model, prompt, 20, sampling=Sampling(temperature=1.5, top_k=1, seed=5)) == greedy(model, prompt, 20)
    # Another seed draws otherwise: on even odds over 1,000 tokens, not on what random weights make likely.
    even, counts = mx.zeros((1, 1000)), mx.zeros((1000,), mx.int32)

    def draws(seed: int) -> list[int]:
        sample = make_sampler(Sampling(temperature=1.0, seed=seed))
        return [sample(even, counts).item() for _ in range(20)]

    assert draws(3) == draws(3) and draws(3) != draws(4)


def test_sampling_filters_keep_only_the_allowed_tokens():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = mx.array(np.log(probs), dtype=mx.float32)
    counts = mx.zeros((4,), mx.int32)

    def drawn(**kwargs):
        sample = make_sampler(Sampling(temperature=1.0, seed=0, **kwargs))
        return {sample(logits, counts).item() for _ in range(300)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert drawn(top_p=0.81) == {0, 1, 2}
    assert drawn(min_p=0.35) == {0, 1}  # 0.15 < 0.35 * 0.5


def test_repetition_and_presence_penalties_follow_transformers():
    logits = mx.array([[2.0, -2.0, 1.0, 0.5]])
    counts = mx.array([1, 3, 0, 0])
    out = apply_penalties(logits, counts, Sampling(repetition_penalty=2.0, presence_penalty=0.25))
    np.testing.assert_allclose(np.array(out), [[2.0 / 2 - 0.25, -2.0 * 2 - 0.25, 1.0, 0.5]])
    ref = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[2.0, -2.0, 1.0, 0.5]]))
    np.testing.assert_allclose(np.array(apply_penalties(logits, counts, Sampling(repetition_penalty=2.0))),
                               ref.numpy())


def test_greedy_with_a_huge_repetition_penalty_never_repeats_a_token(moe_model):
    model, _ = moe_model
    tokens = greedy(model, prompt_ids(), 40, sampling=Sampling(repetition_penalty=1e9))
    assert len(set(tokens)) == len(tokens)


def test_defaults_follow_qwen_guidance_per_mode_then_generation_config_then_the_user():
    assert default_sampling(False) == Sampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)
    assert default_sampling(True) == Sampling(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    config = {"temperature": 0.5, "top_p": 0.9, "top_k": 40}
    assert default_sampling(True, config) == Sampling(temperature=0.5, top_p=0.9, top_k=40)
    assert default_sampling(False, config).temperature == 0.7
    assert default_sampling(True, config, temperature=0.0, top_k=None).temperature == 0.0


def test_the_edges_of_every_setting_are_accepted():
    check_generation(1, thinking_budget=0, prefill_step=1, temperature=0, top_p=1, top_k=0, min_p=1,
                     presence_penalty=-2, repetition_penalty=0.5, seed=2**64 - 1)
    check_generation(1, seed=0, min_p=0, top_p=1e-9)


def test_a_bad_value_in_generation_config_names_the_file():
    with pytest.raises(QwenMLXError, match=r"^generation_config.json: top_p must be in \(0, 1\], got 2$"):
        default_sampling(True, {"top_p": 2})
    assert default_sampling(False, {"top_p": 2}) == default_sampling(False)  # non-thinking mode does not read it
    assert default_sampling(True, {"top_k": None}).top_k == 20  # a null is not a value
class NeverSaying:
    """The model with some tokens never chosen (logit -inf), so that a test holds whatever the weights prefer."""

    def __init__(self, model, token_ids):
        self.model = model
        self.mask = mx.zeros((model.config.vocab_size,)).at[mx.array(list(token_ids))].add(-float("inf"))

    def __call__(self, tokens, cache=None):
        return self.model(tokens, cache) + self.mask

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_thinking_budget_closes_the_thought_with_qwens_text(moe_model):
    model, tokenizer = moe_model
    # Neither closing the thought early, nor opening another, nor stopping: only the budget's work is seen.
    model = NeverSaying(model, {tokenizer.think_start_id, tokenizer.think_end_id, *tokenizer.eos_token_ids})
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True) + [tokenizer.think_start_id]
    steps = list(stream_generate(model, tokenizer, prompt, sampling=Sampling(), max_tokens=40, thinking_budget=5))
    budget = tokenizer.encode(THINKING_BUDGET_TEXT)
    tokens = [s.token for s in steps]
    assert tokens[5 : 5 + len(budget)] == budget
    thought_end = 5 + budget.index(tokenizer.think_end_id) + 1
    assert all(s.thinking for s in steps[:thought_end])
    assert not any(s.thinking for s in steps[thought_end:])
    assert len(steps) == 40 and steps[-1].stats.finish_reason == "length"
    assert "".join(s.text for s in steps) == tokenizer.decode(tokens)


def test_stream_generate_stops_on_the_tokenizers_stop_tokens_and_reports_stats(moe_model):
    model, tokenizer = moe_model
    prompt = tokenizer.encode("hello world")
    first = greedy(model, prompt, 12)
    stopping_at_4th = copy.copy(tokenizer)
    stopping_at_4th.eos_token_ids = frozenset({first[3]})
    steps = list(stream_generate(model, stopping_at_4th, prompt, sampling=Sampling(), max_tokens=12))
    stats = steps[-1].stats
    assert [s.token for s in steps] == first[: first.index(first[3]) + 1]
    assert stats.finish_reason == "stop" and stats.prompt_tokens == len(prompt)
    assert stats.prefill_tps > 0 and stats.peak_memory_gb > 0


def test_chunked_prefill_fills_the_cache_as_one_pass_does(moe_model):
    model, _ = moe_model
    tokens = prompt_ids(100, seed=4)
    chunked, whole = make_cache(model), make_cache(model)
    progress = []
    prefill(model, chunked, tokens, step=32, on_progress=lambda done, total: progress.append((done, total)))
    prefill(model, whole, tokens, step=100)
    assert progress == [(32, 100), (64, 100), (96, 100), (100, 100)]
    for a, b in zip(chunked, whole):
        for x, y in zip(a.state, b.state):
            np.testing.assert_allclose(np.array(x), np.array(y), atol=1e-5)


def test_prefill_step_shrinks_with_context_to_fit_memory():
    qwen3_30b = Model.__new__(Model)  # the config alone, no weights
    qwen3_30b.config = config_from_dict(json.loads((Path(__file__).parent / "fixtures/config-Qwen3-30B-A3B.json").read_text()))
    gb = 1 << 30
    assert prefill_step_for(qwen3_30b, 1_000, memory=64 * gb) == 2048
    # A 32 GB Mac with the 4-bit model loaded has ~12 GB left; at 20K tokens a 2,048 step does not fit.
    step = prefill_step_for(qwen3_30b, 20_000, memory=12 * gb)
    assert 256 <= step <= 1024
    assert prefill_step_for(qwen3_30b, 120_000, memory=12 * gb) < step
