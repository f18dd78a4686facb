"""`lorakit serve` end to end: the real `openai` client against a uvicorn server on loopback, a tiny random Llama
with three adapters of different ranks and targets, each answer checked against lorakit's own greedy decoding."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2", reason="the openai client's HTTP library")

import lorakit as lk  # noqa: E402
from models import cli_fails_cleanly, save_tiny_causal_lm  # noqa: E402

KEY = "sk-lorakit-test"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# adapter name -> (targets, rank): different ranks and target sets share one batch
ADAPTERS = {"a": (["q_proj", "v_proj"], 4), "b": ("all-linear", 8), "c": (["k_proj", "o_proj", "down_proj"], 2)}
PROMPTS = ["Hello there", "The quick brown fox jumps over", "a", "One two three four five six seven eight nine"]


def _save_adapter(base, folder: Path, targets, r: int, seed: int, **cfg) -> None:
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, targets=targets, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for a in layer.adapters.values():
                a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.5)
    lk.save_adapter(model, folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The base model, its tokenizer, an --adapter-dir holding adapters a, b, c, d, and a reference model that
    holds them all (for lk.Decoder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_causal_lm(root / "base")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = TEMPLATE
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapter_dir = root / "adapters"
    for i, (name, (targets, r)) in enumerate({**ADAPTERS, "d": (["up_proj"], 4)}.items()):
        _save_adapter(base, adapter_dir / name, targets, r, seed=i)
    ref = copy.deepcopy(base)
    for name in [*ADAPTERS, "d"]:
        lk.load_adapter(ref, adapter_dir / name, name=name)
    return {"root": root, "base": base, "tok": tok, "adapter_dir": adapter_dir, "ref": ref,
            "decoder": lk.Decoder(ref), "refs": {}}


def expected(world, ids: list[int], adapter: str | None, n: int) -> str:
    """lorakit's single-request greedy decoding of `ids` with `adapter`: its new text."""
    key = (tuple(ids), adapter, n)
    if key not in world["refs"]:
        out = world["decoder"](torch.tensor([ids]), max_new_tokens=n, adapters=[adapter])[0, len(ids):].tolist()
        eos = world["tok"].eos_token_id
        out = out[:out.index(eos)] if eos in out else out
        world["refs"][key] = world["tok"].decode(out, skip_special_tokens=True)
    return world["refs"][key]


def chat_ids(world, messages) -> list[int]:
    """The prompt `lorakit train` puts before the reply to `messages` (training on chat data)."""
    from lorakit.data import DataConfig, build_examples

    (ex,), _ = build_examples([{"messages": [*messages, {"role": "assistant", "content": "x"}]}], world["tok"],
                              DataConfig(task="sft", add_eos=False))
    first_in_loss = next(i for i, label in enumerate(ex["labels"]) if label != -100)
    return ex["input_ids"][:first_in_loss]


@pytest.fixture(scope="module")
def server(world):
    """The server under test: adapters a and b named at start, c and d only in --adapter-dir; at most two
    adapters in the model at once, so serving all of them swaps."""
    from lorakit.serve.cli import build, start

    app = build(copy.deepcopy(world["base"]), {n: str(world["adapter_dir"] / n) for n in ("a", "b")},
                tokenizer=world["tok"], adapter_dir=str(world["adapter_dir"]), served_name="base", api_key=KEY,
                max_loras=2, kv_budget=2048, max_batch=6, prefill_chunk=4, max_tokens=64, max_body_bytes=20_000)
    running = start(app)
    running.app = app
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=30, **kw)


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    for word in words:
        assert word in error["message"] or word in (error["param"] or "") or word == error["code"], error
    return error


# -- answers --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["base", "a", "b", "c"])
def test_completion_is_lorakits_greedy_decoding(world, client, model):
    ids = world["tok"](PROMPTS[1])["input_ids"]
    out = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert out.choices[0].text == expected(world, ids, None if model == "base" else model, 12)
    assert out.choices[0].finish_reason == "length" and out.model == model
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 12,
                                                                                              len(ids) + 12)


def test_adapters_differ_from_each_other(world):
    ids = world["tok"](PROMPTS[0])["input_ids"]
    texts = {m: expected(world, ids, m, 12) for m in [None, *ADAPTERS]}
    assert len(set(texts.values())) == len(texts), texts  # else the tests above could not tell adapters apart


def test_chat_is_lorakits_greedy_decoding_of_the_template(world, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    out = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == expected(world, chat_ids(world, messages), "b", 10)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(chat_ids(world, messages))


def test_stream_equals_non_stream(world, client):
    for model in ("base", "a"):
        whole = client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=16, temperature=0)
        chunks = list(client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 16
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="c", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="c", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_concurrent_requests_over_adapters_equal_one_by_one(world, client):
    """Twelve requests at once over the base and three adapters (two fit in the model at once): each answer is
    the one it gets alone, whatever shared its batch."""
    jobs = [(PROMPTS[i % 4], [None, "a", "b", "c"][(i * 3) % 4], 6 + (i * 5) % 11) for i in range(12)]

    def ask(job):
        prompt, adapter, n = job
        return client.completions.create(model=adapter or "base", prompt=prompt, max_tokens=n,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, jobs))
    for (prompt, adapter, n), text in zip(jobs, got):
        assert text == expected(world, world["tok"](prompt)["input_ids"], adapter, n), (prompt, adapter, n)


def test_sampling_settings(world, client):
    ids = world["tok"](PROMPTS[2])["input_ids"]
    greedy = expected(world, ids, "a", 12)
    top1 = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=12, temperature=1.5, top_p=0.9,
                                     extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy  # top_k=1 keeps the most likely token only
    tiny = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=12, temperature=1e-9)
    assert tiny.choices[0].text == greedy  # (dividing the logits by it would overflow)
    draws = [client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=12, temperature=1.5, seed=s)
             .choices[0].text for s in (7, 7, 8)]
    assert draws[0] == draws[1] != draws[2]
    cut = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    stopped = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].text == greedy[:greedy.index(cut)] and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a", prompt=PROMPTS[2], max_tokens=12, temperature=0, stop=cut,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_text_stream_hands_out_what_decoding_the_whole_gives(world):
    """Token by token, text is handed out in pieces that add up to the decoding of all the tokens, also where
    characters span several tokens; a stop string cuts it, and what could begin one is held back."""
    import random

    from lorakit.serve.sampling import TextStream

    tok, g = world["tok"], random.Random(0)
    sequences = [tok(t)["input_ids"] for t in ("héllo wörld ✓ 日本語 🙂 done", "a  b\n\nc")]
    sequences += [[g.randrange(len(tok)) for _ in range(40)] for _ in range(5)]
    for ids in sequences:
        stream = TextStream(tok, [])
        parts = [stream.ready() for t in ids if not stream.add(t)] + [stream.ready(final=True)]
        assert "".join(parts) == tok.decode(ids, skip_special_tokens=True)
    stream, parts = TextStream(tok, ["wörld"]), []
    for t in tok("héllo wörld ✓")["input_ids"]:
        if stream.add(t):
            break
        parts.append(stream.ready())
        assert not "".join(parts).endswith(("w", "wö")), parts  # maybe the start of the stop string
    assert "".join(parts) + stream.ready(final=True) == "héllo "


# -- adapters ---------------------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "base" and {"a", "b", "c", "d"} <= set(ids)


def test_load_and_unload(world, server, client):
    messages = [{"role": "user", "content": "Count"}]
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "d"})
    assert r.status_code == 200 and "fresh" in r.text
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "d"}), 400, "fresh")
    out = client.chat.completions.create(model="fresh", messages=messages, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == expected(world, chat_ids(world, messages), "d", 8)
    assert "fresh" in [m.id for m in client.models.list().data]
    slot = server.app.state.registry.device["fresh"]
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200
    assert "fresh" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="fresh", messages=messages, max_tokens=8)
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "fresh"}), 404, "model_not_found")
    engine = server.app.state.engine
    wait_for(lambda: slot not in lk.adapter_names(engine.model))  # the model gives it back: no row uses it


def test_adapter_paths_stay_inside_adapter_dir(world, server, tmp_path):
    outside = tmp_path / "outside"
    _save_adapter(world["base"], outside, ["q_proj"], 2, seed=9)
    (world["adapter_dir"] / "link").symlink_to(outside, target_is_directory=True)
    for path in ["../base", str(outside), "link", "a/../../base", "/etc", "link/"]:
        assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}), 403, "lora_path")
    for name in ["link", "../adapters/a", "/etc/passwd", "a/../b"]:  # `model` naming a folder: the same rule
        assert_error(post(server, "/v1/completions", {"model": name, "prompt": "x", "max_tokens": 2}), 404,
                     "model_not_found")
    assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nothing-here"}), 400)


def test_adapters_that_cannot_share_a_batch_are_refused(world, server):
    import shutil

    _save_adapter(world["base"], world["adapter_dir"] / "saves-head", ["q_proj"], 2, seed=4,
                  modules_to_save=["lm_head"])
    error = assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "h", "lora_path": "saves-head"}), 400)
    assert "modules_to_save" in error["message"] and "lorakit merge" in error["message"]
    dora = world["adapter_dir"] / "dora"
    shutil.copytree(world["adapter_dir"] / "a", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    error = assert_error(post(server, "/v1/load_lora_adapter", {"lora_name": "dora", "lora_path": "dora"}), 400)
    assert "DoRA" in error["message"] and "lorakit merge" in error["message"]


def test_registry_bounds_host_memory_and_model_slots(world):
    from lorakit.serve.adapters import AdapterRegistry

    model = copy.deepcopy(world["base"])
    one = AdapterRegistry(model, world["adapter_dir"])
    one.add("b", "b")
    registry = AdapterRegistry(model, world["adapter_dir"], max_loaded=1, max_cpu_bytes=one.read_bytes)
    registry.add("a", "a")
    registry.add("b", "b")
    assert list(registry.read) == ["b"] and registry.read_bytes == one.read_bytes  # "a" was read first: dropped
    slot_a = registry.acquire("a", busy=set())  # read again from its folder
    assert slot_a in lk.adapter_names(model)
    assert registry.acquire("b", busy={slot_a}) is None  # the one slot is in use
    slot_b = registry.acquire("b", busy=set())
    assert lk.adapter_names(model) == [slot_b]  # "a" made room
    registry.remove("b")
    registry.collect(busy={slot_b})
    assert lk.adapter_names(model) == [slot_b]  # a running row still uses it
    registry.collect(busy=set())
    assert lk.adapter_names(model) == []


# -- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,word", [
    (b"{not json", 400, "JSON"),
    (b"[1, 2]", 400, "object"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ({"model": "base"}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
    ({"model": "base", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "base", "prompt": "word " * 200, "max_tokens": 4}, 400, "context_length_exceeded"),
    ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "base", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "base", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "base", "prompt": "x", "logprobs": 3}, 400, "logprobs"),
    ({"model": "base", "prompt": ["x", "y"]}, 400, "prompt"),
    ({"model": "base", "prompt": [1, 99999999]}, 400, "prompt"),
    ({"model": "base", "prompt": ""}, 400, "prompt"),
    ({"model": "base", "prompt": "x", "stop": ["s"] * 5}, 400, "stop"),
    ({"model": "base", "prompt": "x" * 30_000}, 413, "bytes"),
    ({"model": 5, "prompt": "x"}, 400, "model"),
    ({"model": "base", "prompt": "x", "seed": 1 << 70}, 400, "seed"),
    ({"model": "base", "prompt": "x", "top_k": 10 ** 30}, 400, "top_k"),
])
def test_malformed_completion_requests_get_4xx(server, body, status, word):
    assert_error(post(server, "/v1/completions", body), status, word)


@pytest.mark.parametrize("body,word", [
    ({"model": "a"}, "messages"),
    ({"model": "a", "messages": []}, "messages"),
    ({"model": "a", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": "a", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"model": "a", "messages": "hello"}, "messages"),
])
def test_malformed_chat_requests_get_4xx(server, body, word):
    assert_error(post(server, "/v1/chat/completions", body), 400, word)


def test_api_key_and_unknown_routes(server):
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "x"}, key=None), 401, "invalid_api_key")
    assert_error(post(server, "/v1/completions", {"model": "base", "prompt": "x"}, key="sk-wrong"), 401)
    assert_error(httpx.get(server.url + "/v1/models"), 401)
    assert_error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics(server, client):
    client.completions.create(model="a", prompt="x", max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nobody", prompt="x", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("lorakit_requests_total", "lorakit_prompt_tokens_total", "lorakit_generation_tokens_total",
                 "lorakit_queue_length", "lorakit_batch_size", "lorakit_adapters_loaded",
                 "lorakit_time_to_first_token_seconds_bucket", "lorakit_time_per_output_token_seconds_bucket"):
        assert name in text, name
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["lorakit_generation_tokens_total"] >= 3 and samples["lorakit_adapters_loaded"] >= 1
    refused = {s.labels["status"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "lorakit_rejected_requests_total"}
    assert refused["404"] >= 1


# -- the engine alone ----------------------------------------------------------------------------------------------
class Collect:
    """Requests for an Engine, and what they heard."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.events: dict[int, list] = {}
        self.waiting = 0

    def request(self, ids, n: int, on_event=None, **params):
        from lorakit.serve.engine import Request
        from lorakit.serve.sampling import SamplingParams

        self.waiting += 1
        events = []

        def emit(event):
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event.finish_reason is not None:
                self.waiting -= 1
                if not self.waiting:
                    self.done.set()

        r = Request(list(ids), SamplingParams(max_tokens=n, temperature=0, **params), emit)
        self.events[r.id] = events
        return r


def test_prefill_is_read_in_chunks_between_decode_steps(world):
    """A long prompt arriving while a row decodes is read `prefill_chunk` tokens a turn, the running row getting
    a token each turn; and both rows still get their own greedy tokens."""
    from lorakit.serve.engine import Engine

    engine = Engine(copy.deepcopy(world["base"]), world["tok"], prefill_chunk=4).start()
    try:
        c = Collect()
        short = c.request(world["tok"]("a")["input_ids"], 40)
        engine.submit(short)
        wait_for(lambda: short.generated >= 2)
        long_ids = world["tok"](" ".join(["word"] * 40))["input_ids"]
        seen = {}
        long = c.request(long_ids, 5, on_event=lambda e: seen.setdefault("first", short.generated))
        start = short.generated
        engine.submit(long)
        assert c.done.wait(30)
    finally:
        engine.stop()
    assert seen["first"] - start >= len(long_ids) // 4 - 1  # one decode step per chunk read
    for r, ids in ((short, short.prompt), (long, long_ids)):
        text = "".join(e.text for e in c.events[r.id])
        assert text == expected(world, ids, None, r.params.max_tokens)


class IdsTokenizer:
    """Enough of a tokenizer for the engine: text is the token ids."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(params=["off", "on"])
def fast_path(request):
    """The fast path off (the reference path, the CPU's default) and on (what a GPU runs)."""
    lk.set_fast_path(request.param)
    yield request.param
    lk.set_fast_path("auto")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_engine_rows_are_their_own_greedy_decoding(kind, fast_path, tmp_path):
    """GPT-2 (Conv1D layers) and Llama: five prompts of different lengths, three through an adapter, decoded in
    one batch, long ones read in chunks, short ones together: each row's tokens are lk.Decoder's for that prompt
    alone. With the fast path on the adapters stay stacked across steps."""
    from models import make, randomize

    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.engine import Engine

    base = make(kind)
    base.generation_config.eos_token_id = None
    ref = copy.deepcopy(base)
    lk.inject(ref, lk.LoraConfig(r=4, alpha=8, targets="all-linear"), name="x")
    randomize(ref)
    lk.save_adapter(ref, tmp_path / "x", name="x")
    registry = AdapterRegistry(base)
    registry.add("x", tmp_path / "x", confine=False)
    # chunks of 6: the 7- and 8-token prompts are read in two turns each, the next two in one padded batch
    engine = Engine(base, IdsTokenizer(), registry, max_batch=5, prefill_chunk=6)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [5, 5], [3, 1, 4, 1, 5, 9, 2, 6], [8, 8, 8]]
    adapters = ["x", None, "x", None, "x"]
    c = Collect()
    requests = [c.request(p, 10) for p in prompts]
    for r, adapter in zip(requests, adapters):
        r.adapter = adapter
        engine.submit(r)
    engine.start()
    try:
        assert c.done.wait(30)
    finally:
        engine.stop()
    decoder = lk.Decoder(ref)
    for r, p, adapter in zip(requests, prompts, adapters):
        assert r.stream.ids == decoder(torch.tensor([p]), max_new_tokens=10, adapters=[adapter])[0, len(p):].tolist()


def test_a_request_waiting_for_an_adapter_slot_is_not_passed_over(world, fast_path):
    """One slot in the model: a request for adapter b, behind one for a, gets the slot once a's rows finish,
    before the later requests for a (which would keep the slot busy forever); base requests pass it. Adapters
    leave and enter the model between steps, and every answer is still its greedy decoding (with the fast path
    on, the stacked adapters follow)."""
    from lorakit.serve.adapters import AdapterRegistry
    from lorakit.serve.engine import Engine

    registry = AdapterRegistry(copy.deepcopy(world["base"]), world["adapter_dir"], max_loaded=1)
    for name in ("a", "b"):
        registry.add(name, name)
    engine = Engine(registry.model, world["tok"], registry, max_batch=8)
    c, order = Collect(), []
    ids = world["tok"]("one two")["input_ids"]
    requests = {}
    for key, adapter in (("a1", "a"), ("b", "b"), ("a2", "a"), ("base", None), ("a3", "a")):
        r = requests[key] = c.request(ids, 6, on_event=lambda e, key=key: e.finish_reason and order.append(key))
        r.adapter = adapter
        engine.submit(r)
    engine.start()
    try:
        assert c.done.wait(30)
    finally:
        engine.stop()
    assert order.index("b") < order.index("a2") and order.index("base") < order.index("b"), order
    for key, r in requests.items():
        assert "".join(e.text for e in c.events[r.id]) == expected(world, ids, r.adapter, 6), key


def test_requests_beyond_the_kv_budget_wait(world):
    """Rows that could grow past the KV budget (padded to the longest) are not admitted until others finish."""
    from lorakit.serve.engine import Engine

    ids = world["tok"]("one two")["input_ids"]
    total = len(ids) + 10
    engine = Engine(copy.deepcopy(world["base"]), world["tok"], kv_budget=2 * total, max_batch=8)
    c, held = Collect(), []
    note = lambda _: held.append(len(engine.running) + len(engine.prefilling))  # noqa: E731 (the engine's thread)
    requests = [c.request(ids, 10, on_event=note) for _ in range(5)]
    for r in requests:
        engine.submit(r)
    engine.start()
    try:
        assert c.done.wait(30)
    finally:
        engine.stop()
    assert max(held) == 2
    assert all("".join(e.text for e in c.events[r.id]) == expected(world, ids, None, 10) for r in requests)


# -- a gated server: full queue, clients that leave ------------------------------------------------------------------
@pytest.fixture
def gated(world):
    """A server whose model waits at every forward pass until `gate` is set; one row, one waiting request."""
    from lorakit.serve.cli import build, start

    model = copy.deepcopy(world["base"])
    gate = threading.Event()
    model.register_forward_pre_hook(lambda *_: gate.wait(30) and None)
    app = build(model, tokenizer=world["tok"], served_name="base", max_batch=1, max_queue=1, max_tokens=64)
    running = start(app)
    running.gate, running.engine = gate, app.state.engine
    yield running
    gate.set()
    running.stop()


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_answers_429_with_retry_after(gated):
    body = {"model": "base", "prompt": "x", "max_tokens": 3}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, gated, "/v1/completions", body)
        wait_for(lambda: gated.engine.load()["prefilling"] == 1)
        second = pool.submit(post, gated, "/v1/completions", body)
        wait_for(lambda: gated.engine.load()["waiting"] == 1)
        refused = post(gated, "/v1/completions", body)
        assert_error(refused, 429, "rate_limit_exceeded")
        assert refused.headers["retry-after"] == "1"
        gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_client_that_leaves_frees_its_row(gated, stream):
    body = {"model": "base", "prompt": "x", "max_tokens": 60, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        with httpx.stream("POST", gated.url + "/v1/completions", json=body, timeout=0.5) as r:
            for _ in r.iter_lines():
                pass
    wait_for(lambda: gated.engine.prefilling[0].cancelled)  # the server saw the client leave
    gated.gate.set()
    wait_for(lambda: gated.engine.load() == {"waiting": 0, "prefilling": 0, "running": 0})
    metrics = gated.server.config.app.state.metrics
    assert metrics.generation_tokens._value.get() < 60  # it stopped early, not at max_tokens


# -- load -----------------------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_bounded_load(world, server, client):
    """16 clients over four models (three adapters, two slots in the model), three requests each, for two rounds:
    every request answered right, and the resident memory after the second round is that of the first."""
    def round_() -> int:
        done = []

        def worker(i: int) -> None:
            model = ["base", "a", "b", "c"][i % 4]
            for k in range(3):
                prompt = PROMPTS[(i + k) % 4]
                out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
                ids = world["tok"](prompt)["input_ids"]
                assert out.choices[0].text == expected(world, ids, None if model == "base" else model, 8)
                done.append(1)

        with ThreadPoolExecutor(16) as pool:
            for f in [pool.submit(worker, i) for i in range(16)]:
                f.result()
        return len(done)

    for prompt in PROMPTS:  # references first: they are computed in this process too
        for m in [None, "a", "b", "c"]:
            expected(world, world["tok"](prompt)["input_ids"], m, 8)
    assert round_() == 48
    first = rss_bytes()
    assert round_() == 48
    assert rss_bytes() - first < 64 << 20, (first, rss_bytes())
    assert server.app.state.engine.load() == {"waiting": 0, "prefilling": 0, "running": 0}


# -- command line ---------------------------------------------------------------------------------------------------
def test_serve_with_no_arguments_says_how_to_make_an_adapter(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_fails_cleanly(capsys, ["serve"], "lorakit train", "runs/default/adapter")


def test_serve_flags_fail_cleanly(capsys, tmp_path):
    cli_fails_cleanly(capsys, ["serve", "--adapter", "no-equals-sign"], "NAME=DIR")


# -- vLLM's loading rules -------------------------------------------------------------------------------------------
def test_vllm_problems_names_each_rule(world, tmp_path):
    from safetensors.torch import save_file

    from lorakit.serve import vllm_problems

    assert vllm_problems(world["adapter_dir"] / "a") == []
    _save_adapter(world["base"], tmp_path / "head", ["q_proj"], 2, seed=1, modules_to_save=["lm_head"])
    _save_adapter(world["base"], tmp_path / "wide", ["q_proj"], 64, seed=1)
    _save_adapter(world["base"], tmp_path / "huge", ["q_proj"], 1024, seed=1)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                         "use_dora": True, "target_modules": ["norm"]}))
    save_file({"base_model.model.model.norm.lora_A.weight": torch.zeros(8, 4),
               "base_model.model.model.norm.lora_B.weight": torch.zeros(4, 8)}, str(odd / "adapter_model.safetensors"))
    assert any("modules_to_save" in p for p in vllm_problems(tmp_path / "head"))
    assert any("--max-lora-rank 64" in p for p in vllm_problems(tmp_path / "wide"))
    assert any("512" in p for p in vllm_problems(tmp_path / "huge"))
    found = vllm_problems(odd)
    assert any("DoRA" in p for p in found) and any("'norm'" in p for p in found), found
    assert "cannot be read" in vllm_problems(tmp_path / "missing")[0]


def test_serve_warns_about_vllm_rules_when_it_loads(world, server, caplog):
    _save_adapter(world["base"], world["adapter_dir"] / "rank32", ["q_proj"], 32, seed=2)
    with caplog.at_level("WARNING", logger="lorakit.serve"):
        r = post(server, "/v1/load_lora_adapter", {"lora_name": "rank32", "lora_path": "rank32"})
    assert r.status_code == 200 and "--max-lora-rank 32" in r.text
    assert "--max-lora-rank 32" in caplog.text
    card = next(m for m in httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
                .json()["data"] if m["id"] == "rank32")
    assert "--max-lora-rank 32" in card["vllm_warnings"][0]


@pytest.fixture
def fake_uvicorn(monkeypatch):
    """uvicorn.run replaced by a recorder: `lorakit serve` builds its app and returns."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_serve_command_builds_the_server(world, fake_uvicorn, capsys):
    from lorakit.cli import main

    assert main(["serve", "--model", str(world["root"] / "base"), "--adapter", f"x={world['adapter_dir'] / 'a'}",
                 "--adapter-dir", str(world["adapter_dir"]), "--max-loras", "3"]) == 0
    app, kw = fake_uvicorn[0]
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000)  # this machine only, unless told otherwise
    assert app.state.registry.names() == ["x"] and app.state.registry.max_loaded == 3
    assert app.state.engine.model.device.type == "cpu"


def test_serve_with_no_arguments_serves_what_train_left(world, fake_uvicorn, tmp_path, monkeypatch):
    """`lorakit serve` alone: the default model with the adapter `lorakit train` leaves in runs/default/adapter
    (here the default model is the tiny one, to keep the test quick)."""
    import lorakit.serve.cli as serve_cli
    from lorakit.cli import main

    monkeypatch.setattr(serve_cli, "DEFAULT_MODEL", str(world["root"] / "base"))
    monkeypatch.chdir(tmp_path)
    _save_adapter(world["base"], tmp_path / "runs" / "default" / "adapter", ["q_proj"], 2, seed=5)
    assert main(["serve"]) == 0
    app, _ = fake_uvicorn[0]
    assert app.state.registry.names() == ["default"]


def test_the_default_is_what_lorakit_train_leaves():
    from lorakit.serve.cli import DEFAULT_ADAPTER, DEFAULT_MODEL
    from lorakit.train.config import builtin_defaults

    train = builtin_defaults()["train"]
    assert (DEFAULT_MODEL, DEFAULT_ADAPTER) == (train["model"], Path(train["output_dir"]) / "adapter")
