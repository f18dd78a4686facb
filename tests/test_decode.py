"""lk.GreedyDecoder: greedy decode with a static KV cache (a CUDA graph per step on a GPU) gives the
tokens of model.generate(do_sample=False)."""

import pytest
import torch

import lorakit as lk
from lorakit.fast.decode import decode_unsupported
from lorakit.fast import state_of
from models import make, randomize

CUDA = torch.cuda.is_available()


def adapted(kind: str, device: str = "cpu", dtype=torch.float32):
    model = make(kind)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model, std=0.1)  # B != 0: the adapters change the tokens
    return model.to(device=device, dtype=dtype).eval()


def prompts(batch: int = 3, length: int = 7, seed: int = 0, device: str = "cpu"):
    """Left-padded prompts of different lengths (row i has i padding positions, row 0 none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, :i] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def reference(model, ids, mask, new, eos, pad=0):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                          pad_token_id=pad, eos_token_id=eos)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tokens_are_those_of_generate(kind):
    model = adapted(kind)
    ids, mask = prompts()
    want = reference(model, ids, mask, 12, eos=95)
    got = lk.greedy_decode(model, ids, mask, 12, eos_token_id=95, pad_token_id=0)
    assert got.shape == want.shape == (3, 19)
    assert torch.equal(got, want)
    with lk.disabled(model):  # the adapters matter to these tokens
        assert not torch.equal(lk.greedy_decode(model, ids, mask, 12, eos_token_id=95, pad_token_id=0), want)


def test_rows_that_end_continue_with_padding_and_decoding_stops_when_all_have():
    model = adapted("llama")
    ids, mask = prompts()
    free = reference(model, ids, mask, 20, eos=None)[:, 7:]
    # each row ends at a token it generates: row i at its (2 + 3i)th new token (or earlier, where repeated)
    eos = [int(free[i, 2 + 3 * i]) for i in range(3)]
    want = reference(model, ids, mask, 20, eos=eos, pad=1)
    assert want.shape[1] < 7 + 20 and (want[:, 7:] == 1).any()  # generate stopped early and padded
    decoder = lk.GreedyDecoder(model)
    got = decoder(ids, mask, 20, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, want)


def test_one_decoder_serves_batches_of_other_lengths_and_sizes():
    model = adapted("llama")
    decoder = lk.GreedyDecoder(model, cache_multiple=32)
    for batch, length, new, seed in [(3, 7, 10, 0), (3, 12, 6, 1), (2, 5, 9, 2), (3, 7, 10, 3)]:
        ids, mask = prompts(batch, length, seed)
        assert torch.equal(decoder(ids, mask, new, eos_token_id=95, pad_token_id=0),
                           reference(model, ids, mask, new, eos=95))
    # one static cache (and graph) per batch size, while the prompts and new tokens fit
    assert sorted(decoder._sessions) == [(2, 32, False, False), (3, 32, False, False)]
    ids, mask = prompts(3, 30, 4)
    assert torch.equal(decoder(ids, mask, 12, eos_token_id=95, pad_token_id=0), reference(model, ids, mask, 12, eos=95))
    assert sorted(decoder._sessions) == [(2, 32, False, False), (3, 32, False, False), (3, 64, False, False)]
    ids, mask = prompts(3, 20, 5)  # 30 positions: the cache of 32 serves
    assert torch.equal(decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0), reference(model, ids, mask, 10, eos=95))
    assert len(decoder._sessions) == 3


def two_adapters(kind: str, device: str = "cpu", dtype=torch.float32):
    model = adapted(kind)
    lk.inject(model, lk.LoraConfig(r=2, alpha=8, targets="all-linear"), name="other")
    randomize(model, std=0.2, seed=7)
    return model.to(device=device, dtype=dtype).eval()


def routed_reference(model, ids, mask, new, names):
    with lk.route(model, names):
        return reference(model, ids, mask, new, eos=95)


@pytest.mark.parametrize("fast", ["auto", "on"])
def test_adapters_per_prompt_give_the_tokens_of_generate_under_route(fast):
    model = two_adapters("llama")
    decoder = lk.GreedyDecoder(model)
    lk.set_fast_path(fast)  # "on": the decoder's own stacks and rows tensors, rewritten for each batch
    try:
        for names, seed in ((["other", None, "default"], 0), (["default", "default", "other"], 1)):
            ids, mask = prompts(seed=seed)
            got = decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0, adapters=names)
            assert torch.equal(got, routed_reference(model, ids, mask, 10, names))
            assert not torch.equal(got, reference(model, ids, mask, 10, eos=95))  # the routing mattered
        assert not any(m in state_of(m).pins for _, m in lk.lora_layers(model))  # nothing left behind
        generation = decoder._pins.generation
        names = ["default", "other", None]
        got = decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0, adapters=names)
        assert decoder._pins.generation == generation  # the same stacks and rows tensors served a new mix
        assert torch.equal(got, routed_reference(model, ids, mask, 10, names))
        with torch.no_grad():  # an adapter changed in place: stacked again
            for n, p in model.named_parameters():
                if "adapters.other.lora_B" in n:
                    p.mul_(-3)
        got = decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0, adapters=names)
        assert decoder._pins.generation > generation
        assert torch.equal(got, routed_reference(model, ids, mask, 10, names))
        # sampling per prompt's adapter: with one token left (top_k=1) the routed greedy tokens
        got = decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0, adapters=names, do_sample=True, top_k=1)
        assert torch.equal(got, routed_reference(model, ids, mask, 10, names))
    finally:
        lk.set_fast_path("auto")


def test_bad_calls_name_the_fix():
    model = adapted("llama")
    ids, mask = prompts()
    with pytest.raises(lk.ConfigError, match="pad on the left"):
        lk.greedy_decode(model, ids, mask.flip(1))
    with pytest.raises(lk.ConfigError, match="must match"):
        lk.greedy_decode(model, ids, mask[:, 1:])
    with pytest.raises(lk.ConfigError, match="cuda_graphs"):
        lk.GreedyDecoder(model, cuda_graphs="sometimes")
    with pytest.raises(lk.ConfigError, match="model.generate"):
        lk.GreedyDecoder(make("bert"))
    assert lk.greedy_decode(model, ids, mask, 0) is ids
    decoder = lk.GreedyDecoder(model)
    with pytest.raises(lk.ConfigError, match="one name"):
        decoder(ids, mask, 4, adapters=["default"])
    with lk.route(model, ["default"] * 3), pytest.raises(lk.ConfigError, match="adapters="):
        decoder(ids, mask, 4)


def test_what_it_does_not_decode_is_named():
    model = adapted("llama")
    assert decode_unsupported(model, {"do_sample": False, "num_beams": 1, "max_new_tokens": 4}) is None
    assert decode_unsupported(model, {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 0.9}) is None
    assert "typical_p" in decode_unsupported(model, {"do_sample": True, "typical_p": 0.5})
    assert decode_unsupported(model, {"do_sample": True, "min_p": 0.1}) is None
    assert "temperature" in decode_unsupported(model, {"temperature": 0.7})  # without sampling generate ignores it
    assert decode_unsupported(model, {"num_beams": 4}) == "beam search"
    assert "repetition_penalty" in decode_unsupported(model, {"repetition_penalty": 1.2})
    before = model.generation_config.no_repeat_ngram_size
    model.generation_config.no_repeat_ngram_size = 2
    assert "no_repeat_ngram_size" in decode_unsupported(model)
    model.generation_config.no_repeat_ngram_size = before
    with lk.route(model, ["default", None, "default"]):
        assert "route" in decode_unsupported(model)
    assert "not a Hugging Face" in decode_unsupported(torch.nn.Linear(2, 2))
    from transformers import MistralConfig, MistralForCausalLM
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                sliding_window=8))
    assert "SlidingWindow" in decode_unsupported(windowed)  # its cache keeps a write position on the host


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_captured_steps_give_the_eager_tokens_on_gpu(kind):
    model = adapted(kind, "cuda", torch.bfloat16)
    decoder = lk.GreedyDecoder(model, cuda_graphs="on", cache_multiple=32)
    eager = lk.GreedyDecoder(model, cuda_graphs="off", cache_multiple=32)
    for seed, length in ((0, 7), (1, 7), (2, 12)):  # later batches replay the step captured for the first
        ids, mask = prompts(length=length, seed=seed, device="cuda")
        got = decoder(ids, mask, 16, eos_token_id=95, pad_token_id=0)
        assert decoder._sessions[(3, 32, False, False)].graph is not None
        assert torch.equal(got, eager(ids, mask, 16, eos_token_id=95, pad_token_id=0))
        assert torch.equal(got, reference(model, ids, mask, 16, eos=95))
    assert list(decoder._sessions) == [(3, 32, False, False)]  # one capture served all three


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_captured_routed_steps_follow_each_batchs_adapters_on_gpu():
    model = two_adapters("llama", "cuda", torch.bfloat16)
    decoder = lk.GreedyDecoder(model, cuda_graphs="on", cache_multiple=32)
    eager = lk.GreedyDecoder(model, cuda_graphs="off", cache_multiple=32)
    graphs = []
    for names, seed in ((["other", None, "default"], 0), (["default", "other", "other"], 1), (None, 2),
                        (["other", "other", None], 3)):
        ids, mask = prompts(seed=seed, device="cuda")
        got = decoder(ids, mask, 16, eos_token_id=95, pad_token_id=0, adapters=names)
        assert torch.equal(got, eager(ids, mask, 16, eos_token_id=95, pad_token_id=0, adapters=names))
        want = routed_reference(model, ids, mask, 16, names) if names else reference(model, ids, mask, 16, eos=95)
        assert torch.equal(got, want)
        graph = decoder._sessions[(3, 32, names is not None, False)].graph
        graphs += [] if any(graph is g for g in graphs) else [graph]
    assert decoder.eager_reason is None
    assert len(graphs) == 2  # one step captured for the three routings, one without routing
    with torch.no_grad():  # an adapter changed in place: the routed step is captured again and follows it
        for n, p in model.named_parameters():
            if "adapters.other.lora_B" in n:
                p.mul_(-3)
    names = ["other", "default", "other"]
    got = decoder(ids, mask, 16, eos_token_id=95, pad_token_id=0, adapters=names)
    assert not any(decoder._sessions[(3, 32, True, False)].graph is g for g in graphs)
    assert torch.equal(got, routed_reference(model, ids, mask, 16, names))


# -- sampling -------------------------------------------------------------------------------------------
def generates_probs(logits, temperature, top_k, top_p, min_p=0.0):
    """The probabilities model.generate(do_sample=True) samples from: transformers' own warpers, in its order."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 50, 1.0, 0.0), (0.7, 10, 0.9, 0.0), (1.3, 0, 0.5, 0.0), (0.5, 3, 1.0, 0.0), (1.0, 0, 0.05, 0.0),
    (2.0, 20, 0.97, 0.0), (1.0, 0, 1.0, 0.1), (0.8, 40, 0.95, 0.05), (1.5, 0, 0.9, 0.3)])
def test_sampling_keeps_what_generates_warpers_keep(temperature, top_k, top_p, min_p):
    from lorakit.fast.decode import sampling_probs

    logits = torch.randn(16, 80, generator=torch.Generator().manual_seed(1)) * 3
    want = generates_probs(logits, temperature, top_k, top_p, min_p)
    probs, order = sampling_probs(logits, temperature, top_k, top_p, min_p)
    got = torch.zeros_like(probs).scatter_(-1, order, probs)
    got = got / got.sum(-1, keepdim=True)
    assert torch.equal(got > 0, want > 0)
    assert torch.allclose(got, want, atol=1e-6)
    # the same with the settings as 0-d tensors (what a captured step reads)
    probs_t, _ = sampling_probs(logits, torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p),
                                torch.tensor(min_p))
    assert torch.equal(probs_t, probs)


def test_draws_follow_the_filtered_distribution():
    from lorakit.fast.decode import sample_tokens

    n = 40000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, 3.0, 0.0]).expand(n, 8)
    want = generates_probs(logits[:1], 0.8, 6, 0.95, 0.15)[0]
    assert (want > 0).sum() == 3  # min_p cut one of the four tokens top-k and top-p kept
    torch.manual_seed(0)
    tokens = sample_tokens(logits, 0.8, 6, 0.95, 0.15)
    freq = torch.bincount(tokens, minlength=8).double() / n
    assert torch.all(freq[want == 0] == 0)  # nothing outside the top-k / top-p set
    sigma = (want * (1 - want) / n).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (freq, want)
    torch.manual_seed(0)
    assert torch.equal(sample_tokens(logits, 0.8, 6, 0.95, 0.15), tokens)  # torch's generator decides


def test_sampled_decoding_follows_the_models_distribution():
    model = adapted("llama")
    decoder = lk.Decoder(model)
    ids, mask = prompts()
    # top_k=1 leaves one token: the greedy ones
    assert torch.equal(decoder(ids, mask, 10, eos_token_id=95, pad_token_id=0, do_sample=True, top_k=1),
                       reference(model, ids, mask, 10, eos=95))
    runs = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        runs.append(decoder(ids, mask, 10, pad_token_id=0, do_sample=True, temperature=1.5, top_k=0))
    assert torch.equal(runs[0], runs[1]) and not (torch.equal(runs[0], runs[2]) and torch.equal(runs[0], runs[3]))
    assert_sampling_rates(model, decoder, ids[:1])
    assert_sampling_rates(model, decoder, ids[:1], t=1.0, p=0.9, min_p=0.9)


def assert_sampling_rates(model, decoder, prompt, t=0.15, p=0.95, min_p=0.0):
    """One prompt many times: the first new token (the prefill's pick) and, after the most frequent first token,
    the second (a decode step's pick) come at the rates of the model's softmax, as generate filters it."""
    n = 4000
    one = prompt.expand(n, -1)
    torch.manual_seed(3)
    out = decoder(one, torch.ones_like(one), 2, pad_token_id=0, do_sample=True, temperature=t, top_p=p, min_p=min_p)
    P = prompt.shape[1]
    with torch.no_grad():
        logits = model(prompt).logits[:, -1].float()
        first = generates_probs(logits, t, 50, p, min_p)[0]
    if min_p:  # the setting under test cuts tokens top-k and top-p keep
        assert (first > 0).sum() < (generates_probs(logits, t, 50, p)[0] > 0).sum()
    top = int(torch.bincount(out[:, P], minlength=first.numel()).argmax())
    rows = out[out[:, P] == top]
    with torch.no_grad():
        second = generates_probs(model(rows[:1, :P + 1]).logits[:, -1].float(), t, 50, p, min_p)[0]
    for tokens, want in ((out[:, P], first), (rows[:, P + 1], second)):
        freq = torch.bincount(tokens, minlength=want.numel()).double() / tokens.numel()
        assert torch.all(freq[want == 0] == 0)
        sigma = (want.double() * (1 - want.double()) / tokens.numel()).sqrt()
        assert torch.all((freq - want.double()).abs() <= 5 * sigma + 1e-12), (freq, want)
    assert rows.shape[0] > n // 40, rows.shape  # enough draws of the second token to test its rates


def test_bad_sampling_settings_name_the_fix():
    model = adapted("llama")
    ids, mask = prompts()
    decoder = lk.Decoder(model)
    with pytest.raises(lk.ConfigError, match="temperature > 0"):
        decoder(ids, mask, 4, do_sample=True, temperature=0)
    with pytest.raises(lk.ConfigError, match="top_k"):
        decoder(ids, mask, 4, do_sample=True, top_k=-1)
    with pytest.raises(lk.ConfigError, match="top_p"):
        decoder(ids, mask, 4, do_sample=True, top_p=0.0)
    with pytest.raises(lk.ConfigError, match="min_p"):
        decoder(ids, mask, 4, do_sample=True, min_p=1.5)
    model.generation_config.top_k = 1  # the model's own setting applies where the call gives none
    assert torch.equal(decoder(ids, mask, 6, eos_token_id=95, pad_token_id=0, do_sample=True),
                       reference(model, ids, mask, 6, eos=95))
    model.generation_config.typical_p = 0.5  # a setting of sampling the decoder does not apply
    assert "typical_p" in decode_unsupported(model, {"do_sample": True})
    assert decode_unsupported(model, {"do_sample": False}) is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_captured_sampling_on_gpu():
    model = adapted("llama", "cuda")
    decoder = lk.Decoder(model, cuda_graphs="on", cache_multiple=32)
    ids, mask = prompts(device="cuda")
    assert torch.equal(decoder(ids, mask, 12, eos_token_id=95, pad_token_id=0, do_sample=True, top_k=1),
                       reference(model, ids, mask, 12, eos=95))
    assert decoder._sessions[(3, 32, False, True)].graph is not None
    runs = []
    for seed in (0, 0, 1):  # the replays draw from torch's CUDA generator, seeded as usual
        torch.manual_seed(seed)
        runs.append(decoder(ids, mask, 12, pad_token_id=0, do_sample=True, temperature=1.5, top_k=0))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert_sampling_rates(model, decoder, ids[:1])  # the second token is a replay's pick
    assert_sampling_rates(model, decoder, ids[:1], t=1.0, p=0.9, min_p=0.9)
    assert decoder._sessions[(4000, 32, False, True)].graph is not None and decoder.eager_reason is None
