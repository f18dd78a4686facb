"""Damaged and hostile adapter files: a clean LoraError or a correct load, never a changed model, never a hang.

The property tests mutate valid adapter folders (adapter_config.json fields, the safetensors header and
tensors, the file's bytes) and loralib checkpoints, load the result into a fresh model and check that
either a `LoraError` came out and the model is exactly as before (state_dict bit for bit, adapters,
active set, which modules are wrapped, requires_grad), or the adapter loaded with finite weights and
`delete_adapter` gives back the base bit for bit. Every load must finish within LOAD_SECONDS.

Run more examples offline, recording raw exceptions instead of failing on the first:
    LORAKIT_FUZZ_EXAMPLES=3000 python tests/test_integrity_files.py
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit as lk
from lorakit.inject import active_adapters, adapter_names
from models import example_input, make, randomize, run

LOAD_SECONDS = 5.0
EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "0"))
#: offline mode: raw exceptions and broken invariants are counted here instead of failing the test
RECORD: collections.Counter | None = collections.Counter() if EXAMPLES else None

FUZZ = settings(max_examples=EXAMPLES or 40, deadline=None, derandomize=not EXAMPLES, database=None,
                suppress_health_check=list(HealthCheck))

# -- seeds: valid adapters to mutate --------------------------------------------------------------------
_TEMPLATES: dict[str, torch.nn.Module] = {}


def pristine(kind: str) -> torch.nn.Module:
    if kind not in _TEMPLATES:
        _TEMPLATES[kind] = make(kind)
    return copy.deepcopy(_TEMPLATES[kind])


SEED_CONFIGS = {
    "mlp": lk.LoraConfig(r=4, alpha=8, targets=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3.0},
                         bias="lora_only", modules_to_save=["head"]),
    "gpt2": lk.LoraConfig(r=2, alpha=4, targets=["c_attn"], slices={"c_attn": [True, False, True]}, rslora=True),
}
_SEEDS: dict[str, tuple[dict, dict, dict]] = {}


def seed_files(kind: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config dict, tensors, safetensors metadata) of a valid saved adapter on `kind`."""
    if kind not in _SEEDS:
        model = pristine(kind)
        lk.inject(model, SEED_CONFIGS[kind])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in lk.trainable_parameters(model):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
        with tempfile.TemporaryDirectory() as d:
            lk.save_adapter(model, d)
            from safetensors import safe_open
            config = json.loads((Path(d) / "adapter_config.json").read_text())
            with safe_open(str(Path(d) / "adapter_model.safetensors"), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                metadata = dict(f.metadata())
        _SEEDS[kind] = (config, tensors, metadata)
    config, tensors, metadata = _SEEDS[kind]
    return copy.deepcopy(config), {k: v.clone() for k, v in tensors.items()}, dict(metadata)


def loralib_seed() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"fc1.lora_A": torch.randn(4, 12, generator=g), "fc1.lora_B": torch.randn(24, 4, generator=g),
            "fc2.lora_A": torch.randn(4, 24, generator=g), "fc2.lora_B": torch.randn(24, 4, generator=g),
            "head.weight": torch.randn(5, 24, generator=g), "head.bias": torch.randn(5, generator=g)}


# -- the property ---------------------------------------------------------------------------------------
def snapshot(model: torch.nn.Module, with_wrappers: bool = True) -> tuple:
    state = tuple((k, v.dtype, tuple(v.shape), v.detach().clone()) for k, v in model.state_dict().items())
    wrappers = tuple(p for p, _ in lk.lora_layers(model)) if with_wrappers else ()
    grads = tuple(p.requires_grad for p in model.parameters()) if with_wrappers else ()
    return state, tuple(adapter_names(model)), tuple(active_adapters(model)), wrappers, grads


def same(a: tuple, b: tuple) -> bool:
    (sa, *ra), (sb, *rb) = a, b
    if ra != rb or len(sa) != len(sb):
        return False
    return all(ka == kb and da == db and ha == hb and torch.equal(va, vb)
               for (ka, da, ha, va), (kb, db, hb, vb) in zip(sa, sb))


def _site(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def _fail(what: str) -> None:
    if RECORD is not None:
        RECORD[what] += 1
        return
    raise AssertionError(what)


def check_load(kind: str, load) -> None:
    """Run load(model) on a fresh model of `kind` and check the property (see the module docstring)."""
    model = pristine(kind)
    before = snapshot(model)
    start = time.perf_counter()
    error = None
    try:
        with _time_limit(LOAD_SECONDS * 4):
            load(model)
    except lk.LoraError as exc:
        error = exc
    except _Hang:
        return _fail("hang: the load did not finish")
    except Exception as exc:  # noqa: BLE001 - the property under test: nothing raw gets out
        if RECORD is None:
            raise
        RECORD["raw: " + _site(exc)] += 1
        error = exc
    took = time.perf_counter() - start
    if took > LOAD_SECONDS:
        _fail(f"slow: a load took {took:.1f} s")
    if error is not None:
        if not same(snapshot(model), before):
            _fail(f"model changed by a failed load ({type(error).__name__})")
        return
    if RECORD is not None:
        RECORD["loaded"] += 1
    names = adapter_names(model)
    if names != ["default"] or active_adapters(model) != ["default"]:
        return _fail(f"loaded, but adapters {names}, active {active_adapters(model)}")
    for path, layer in lk.lora_layers(model):
        a = layer.adapters["default"]
        if not (math.isfinite(a.scale) and a.scale > 0 and torch.isfinite(a.lora_A).all()
                and torch.isfinite(a.lora_B).all()):
            _fail(f"loaded a non-finite adapter on {path}")
    lk.delete_adapter(model, "default")
    if not same(snapshot(model, with_wrappers=False), snapshot(pristine(kind), with_wrappers=False)):
        _fail("delete_adapter after a load did not give the base back")


class _Hang(Exception):
    pass


class _time_limit:
    """Offline only: turn a hang into _Hang (SIGALRM, main thread). In CI a hang fails by the timing check."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds if RECORD is not None and hasattr(__import__("signal"), "setitimer") else 0

    def __enter__(self):
        if self.seconds:
            import signal

            def hang(*_):
                raise _Hang

            self.old = signal.signal(signal.SIGALRM, hang)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        if self.seconds:
            import signal
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


# -- mutations ------------------------------------------------------------------------------------------
CATASTROPHIC = ["(.*)*$x", "(a+)+$x", "(.*a){20}", "(x+x+)+y", "((.*)*)*#", "(.|.)*$x", r"(\w+\s?)*$x",
                ".*.*.*.*.*.*.*.*.*.*.*.*x"]
MODULE_KEYS = ["fc1", "fc2", "head", r"fc\d", "fc.", ".*", "c_attn", r"transformer\.h\.0\.attn\.c_attn", "", "x"]
SPECIAL_NUMBERS = [0, -1, 1, 2, 0.5, 2.0, 1e308, -1e308, float("nan"), float("inf"), True, False, "2", "false",
                   "true", None, 2**63, 10**30, [], {}]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=6),
                    st.sampled_from(SPECIAL_NUMBERS[:-2] + CATASTROPHIC + ["none", "all", "lora_only", "LORA"]))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), c, max_size=3)),
                           max_leaves=6)
CONFIG_FIELDS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "modules_to_save",
                 "lora_dropout", "use_dora", "lora_bias", "peft_type", "target_modules", "fan_in_fan_out",
                 "layers_to_transform", "init_lora_weights"]
DEEP = "[" * 100_000 + "]" * 100_000


@st.composite
def config_text(draw, config: dict) -> str:
    """adapter_config.json text: the seed's with a few fields changed, deleted or made hostile."""
    if draw(st.integers(0, 15)) == 0:
        return draw(st.sampled_from([DEEP, '{"r": ' + DEEP + "}", "null", "[]", '"x"', "{", "", "\udcff"]))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "delete", "pattern", "pattern", "number"]))
        field = draw(st.sampled_from(CONFIG_FIELDS))
        if op == "set":
            config[field] = draw(json_values)
        elif op == "delete":
            config.pop(field, None)
        elif op == "number":
            config[field] = draw(st.sampled_from(SPECIAL_NUMBERS))
        else:
            which = draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))
            if not isinstance(config.get(which), dict):
                config[which] = {}
            key = draw(st.sampled_from(MODULE_KEYS + CATASTROPHIC))
            config[which][key] = draw(st.sampled_from(SPECIAL_NUMBERS))
    return json.dumps(config)


DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.uint8, torch.bool,
          torch.complex64]


@st.composite
def mutate_tensors(draw, tensors: dict[str, torch.Tensor], model_kind: str) -> dict:
    extra_keys = {"mlp": ["fc2.weight", "fc1.bias", "fc1.weight", "head.bias", "head.weight", "nope.weight"],
                  "gpt2": ["transformer.h.0.attn.c_attn.weight", "transformer.ln_f.weight", "transformer.wte.weight",
                           "transformer.h.1.attn.c_attn.bias", "lm_head.weight"]}[model_kind]
    for _ in range(draw(st.integers(0, 2))):
        op = draw(st.sampled_from(["shape", "dtype", "value", "delete", "extra", "extra"]))
        key = draw(st.sampled_from(sorted(tensors))) if tensors else None
        if op == "extra" or key is None:
            name = draw(st.sampled_from(extra_keys))
            key = draw(st.sampled_from(["base_model.model.", ""])) + name
            params = dict(pristine(model_kind).named_parameters())
            shape = params[name].shape if name in params and draw(st.booleans()) else (3,)
            tensors[key] = torch.randn(shape)
        elif op == "shape":
            t = tensors[key].reshape(tensors[key].shape or (1,))
            shapes = [(), (t.numel(),), (*t.shape, 1), tuple(reversed(t.shape)), (t.shape[0] + 1, *t.shape[1:]),
                      (0, *t.shape[1:])]
            tensors[key] = torch.randn(draw(st.sampled_from(shapes)))
        elif op == "dtype":
            tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "value":
            t = tensors[key].clone()
            if t.numel() and t.is_floating_point():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(
                    [float("nan"), float("inf"), -float("inf"), 1e30, 0.0]))
            tensors[key] = t
        else:
            del tensors[key]
    return tensors


@st.composite
def mutate_metadata(draw, metadata: dict[str, str]) -> dict[str, str] | None:
    op = draw(st.sampled_from(["keep", "keep", "none", "field", "field", "text"]))
    if op == "none":
        return None
    if op == "text":
        metadata["lorakit"] = draw(st.sampled_from([DEEP, "{", "null", "[1]", '"x"', "1e999"]))
    elif op == "field":
        meta = json.loads(metadata["lorakit"])
        target = meta
        path = draw(st.sampled_from([[], ["config"], ["base_fingerprint"], ["base_fingerprint", "modules"],
                                     ["slices"], ["adapter_config"]]))
        for p in path:
            if not isinstance(target.get(p), dict):
                break
            target = target[p]
        keys = sorted(target) or ["x"]
        target[draw(st.sampled_from(keys))] = draw(json_values)
        metadata["lorakit"] = json.dumps(meta)
    return metadata


@st.composite
def damage_bytes(draw, data: bytes) -> bytes:
    op = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "flip", "header"]))
    if op == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if op in ("flip", "header"):
        header = 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, min(len(buf), header if op == "header" else len(buf)) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    return data


def _serialize(tensors: dict, metadata: dict | None) -> bytes | None:
    from safetensors.torch import save
    try:
        return save(tensors, metadata=metadata)
    except Exception:  # noqa: BLE001 - a mutation safetensors itself cannot write (e.g. a dtype it lacks)
        return None


@st.composite
def adapter_folder(draw, kind: str) -> tuple[str, bytes | None]:
    config, tensors, metadata = seed_files(kind)
    text = draw(config_text(config)) if draw(st.booleans()) else json.dumps(config)
    data = _serialize(draw(mutate_tensors(tensors, kind)), draw(mutate_metadata(metadata)))
    return text, None if data is None else draw(damage_bytes(data))


def _write_folder(d: Path, text: str, data: bytes) -> None:
    (d / "adapter_config.json").write_text(text, errors="surrogatepass")
    (d / "adapter_model.safetensors").write_bytes(data)


@pytest.mark.parametrize("kind", ["mlp", "gpt2"])
def test_mutated_adapter_folders(kind):
    @FUZZ
    @given(folder=adapter_folder(kind))
    def prop(folder):
        text, data = folder
        if data is None:
            return
        with tempfile.TemporaryDirectory() as d:
            _write_folder(Path(d), text, data)
            check_load(kind, lambda model: lk.load_adapter(model, d))
    prop()


@st.composite
def loralib_file(draw) -> tuple[dict, object, object]:
    state: dict = loralib_seed()
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["key", "value", "shape", "dtype", "nan", "base", "delete", "nest"]))
        key = draw(st.sampled_from(sorted(k for k in state if isinstance(k, str)) or ["fc1.lora_A"]))
        if op == "key":
            state[draw(st.sampled_from([3, ("fc1", "lora_A"), "", "fc9.lora_A", "fc1.lora_A.x", None, 2.5]))] = \
                state.pop(key, torch.zeros(2, 2))
        elif op == "value":
            state[key] = draw(st.sampled_from([1, [1.0], {"a": torch.zeros(1)}, None, "w", 2.5]))
        elif op == "shape" and isinstance(state.get(key), torch.Tensor):
            t = state[key].reshape(state[key].shape or (1,))
            state[key] = torch.randn(draw(st.sampled_from([(), (t.numel(),), (*t.shape, 1), tuple(reversed(t.shape)),
                                                           (t.shape[0] * 3, *t.shape[1:])])))
        elif op == "dtype" and isinstance(state.get(key), torch.Tensor):
            state[key] = state[key].to(draw(st.sampled_from(DTYPES)))
        elif op == "nan" and isinstance(state.get(key), torch.Tensor) and state[key].is_floating_point():
            state[key] = state[key].clone()
            state[key].view(-1)[0] = float("nan")
        elif op == "base":
            name = draw(st.sampled_from(["fc2.weight", "fc1.weight", "fc1.bias", "nope.weight"]))
            shape = dict(pristine("mlp").named_parameters()).get(name, torch.zeros(3)).shape
            state[name] = torch.randn(shape)
        elif op == "delete":
            state.pop(key, None)
        elif op == "nest":
            state = {draw(st.sampled_from(["state_dict", "model", "x"])): state}
    alpha = draw(st.sampled_from([8, 16.0, 8, None, 0, -1, float("nan"), "8", True, 1e308]))
    slices = draw(st.sampled_from([None, None, None, [True], [True, False, True], "x", [1, 0]]))
    return state, alpha, slices


def test_mutated_loralib_files():
    @FUZZ
    @given(file=loralib_file(), damage=st.data())
    def prop(file, damage):
        state, alpha, slices = file
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "lora.pt"
            torch.save(state, path)
            path.write_bytes(damage.draw(st.sampled_from([lambda b: b, lambda b: b[:len(b) // 2],
                                                          lambda b: b[:-1]]))(path.read_bytes()))
            check_load("mlp", lambda model: lk.load_adapter(model, path, alpha=alpha, slices=slices))
    prop()


# -- directed cases -------------------------------------------------------------------------------------
def saved(kind: str, cfg: lk.LoraConfig, directory: Path, seed: int = 0) -> torch.nn.Module:
    model = pristine(kind)
    lk.inject(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lk.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lk.save_adapter(model, directory)
    return model


def rewrite(directory: Path, config: dict | None = None, tensors: dict | None = None,
            metadata: dict | None | bool = True) -> None:
    """Rewrite a saved adapter's config and/or weights (metadata=True keeps the header's)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    weights = directory / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
        old_meta = f.metadata()
    if config is not None:
        (directory / "adapter_config.json").write_text(json.dumps(config))
    if tensors is not None or metadata is not True:
        save_file(old if tensors is None else tensors, weights, metadata=old_meta if metadata is True else metadata)


def fails_cleanly(kind: str, load, match: str) -> None:
    """load(model) raises a LoraError matching `match` and leaves the model exactly as it was."""
    model = pristine(kind)
    before = snapshot(model)
    with pytest.raises(lk.LoraError, match=match):
        load(model)
    assert same(snapshot(model), before)


def test_extra_base_tensor_is_refused_unless_declared(tmp_path):
    """A tensor named after a frozen base parameter is not copied into the base unless the config says so."""
    saved("llama", lk.LoraConfig(r=2, alpha=4, targets=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    from safetensors.torch import load_file
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    model = pristine("llama")
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.bias"):
        shape = model.get_parameter(key).shape if key.endswith("weight") else (32,)
        rewrite(tmp_path, tensors={**tensors, f"base_model.model.{key}": torch.randn(shape)})
        fails_cleanly("llama", lambda m: lk.load_adapter(m, tmp_path), f"holds tensor '{re_escape(key)}', which "
                      "adapter_config.json does not declare")
    # declared, it loads, and delete_adapter / eject(merge=False) put the original back
    norm = torch.randn(32)
    rewrite(tmp_path, config={**config, "modules_to_save": ["norm"]},
            tensors={**tensors, "base_model.model.model.norm.weight": norm}, metadata=None)
    for undo in (lambda m: lk.delete_adapter(m, "default"), lambda m: lk.eject(m, merge=False)):
        model = pristine("llama")
        original = model.model.norm.weight.detach().clone()
        lk.load_adapter(model, tmp_path)
        assert torch.equal(model.model.norm.weight, norm)
        undo(model)
        assert torch.equal(model.model.norm.weight, original)
    model = pristine("llama")
    lk.load_adapter(model, tmp_path)
    lk.eject(model, merge=True)  # PEFT's merge_and_unload keeps the adapter's modules
    assert torch.equal(model.model.norm.weight, norm)


def re_escape(text: str) -> str:
    import re
    return re.escape(text)


def test_delete_restores_in_any_order(tmp_path):
    """Two adapters that each replace the head: deleting either, in any order, ends on the original."""
    for i, seed in enumerate((1, 2)):
        saved("mlp", lk.LoraConfig(r=2, alpha=4, targets=["fc1"], modules_to_save=["head"]), tmp_path / str(i), seed)
    for order in (("a", "b"), ("b", "a")):
        model = pristine("mlp")
        original = model.head.weight.detach().clone()
        lk.load_adapter(model, tmp_path / "0", name="a")
        lk.load_adapter(model, tmp_path / "1", name="b")
        second = model.head.weight.detach().clone()
        lk.delete_adapter(model, order[0])
        assert torch.equal(model.head.weight, second if order[0] == "a" else _head(tmp_path / "0"))
        lk.delete_adapter(model, order[1])
        assert torch.equal(model.head.weight, original)


def _head(directory: Path) -> torch.Tensor:
    from safetensors.torch import load_file
    return load_file(directory / "adapter_model.safetensors")["base_model.model.head.weight"]


@pytest.mark.parametrize("field,value,match", [
    ("use_rslora", "false", "'use_rslora' must be true or false .*found 'false'"),
    ("r", 0.5, "'r' must be a positive integer, found 0.5"),
    ("lora_alpha", float("nan"), "'lora_alpha' must be a positive finite number, found nan"),
    ("alpha_pattern", {"fc1": 2, "fc2": -1}, r"alpha_pattern\['fc2'\] must be a positive finite number, got -1"),
    ("alpha_pattern", {"fc1": 2, "fc2": 0}, r"alpha_pattern\['fc2'\] must be a positive finite number, got 0"),
    ("alpha_pattern", {"fc1": 2, "fc2": 1e308}, r"alpha_pattern\['fc2'\] must be a positive finite number"),
    ("rank_pattern", {"fc1": 4, "fc2": 0.5}, r"rank_pattern\['fc2'\] must be a positive integer, got 0.5"),
    ("rank_pattern", [], "'rank_pattern' must be an object"),
    ("bias", "everything", "'bias' must be one of"),
    ("modules_to_save", "head", "'modules_to_save' must be null or a list"),
])
def test_config_values_checked_as_data(tmp_path, field, value, match):
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1", "fc2"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    rewrite(tmp_path, config={**config, field: value}, metadata=None)
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path), "adapter_config.json: .*" + match)


def test_rslora_read_from_json_booleans_only(tmp_path):
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    rewrite(tmp_path, config={**config, "use_rslora": False}, metadata=None)
    model = pristine("mlp")
    lk.load_adapter(model, tmp_path)
    assert model.fc1.adapters["default"].scale == 2.0


@pytest.mark.parametrize("change,match", [
    (lambda t: t.to(torch.complex64), "is torch.complex64; adapter tensors must be floating point"),
    (lambda t: t.to(torch.int32), "is torch.int32; adapter tensors must be floating point"),
    (lambda t: t.flatten(), "lora_A is \\(48,\\)"),
    (lambda t: t[0, 0], "lora_A is \\(\\)"),
    (lambda t: t.clone().fill_(float("nan")), "holds NaN or inf"),
    (lambda t: t.clone().fill_(float("inf")), "holds NaN or inf"),
])
def test_bad_tensors_refused(tmp_path, change, match):
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), tmp_path)
    from safetensors.torch import load_file, save
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.fc1.lora_A.weight"
    tensors[key] = change(tensors[key])
    try:
        data = save(tensors)
    except Exception:  # noqa: BLE001 - a dtype this safetensors cannot store: torch.save it as PEFT's old .bin
        (tmp_path / "adapter_model.safetensors").unlink()
        torch.save(tensors, tmp_path / "adapter_model.bin")
    else:
        (tmp_path / "adapter_model.safetensors").write_bytes(data)
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path), match)


def test_slices_metadata_that_drops_part_of_B_is_refused(tmp_path):
    saved("gpt2", lk.LoraConfig(r=2, alpha=4, targets=["c_attn"]), tmp_path)  # full-width: B has no zero blocks
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # claim the rank-2 A/B are two rank-1 slices, q and v: B's k block and off-diagonal blocks would be dropped
    meta["slices"] = {f"transformer.h.{i}.attn.c_attn": [True, False, True] for i in range(2)}
    rewrite(tmp_path, config=config, metadata={"format": "pt", "lorakit": json.dumps(meta)})
    fails_cleanly("gpt2", lambda m: lk.load_adapter(m, tmp_path), "would drop non-zero entries of lora_B")


@pytest.mark.parametrize("lorakit_meta,match", [
    ("[1]", "malformed \\(a list, not an object\\)"),
    ('{"slices": {"fc1": "yes"}}', "malformed \\(slices"),
    ('{"base_fingerprint": {"modules": {"fc1": "big"}}}', "malformed \\(base_fingerprint"),
    ('{"format_version": "1"}', "malformed \\(format_version"),
    ('{"adapter_config": 3}', "malformed \\(adapter_config"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON \\(RecursionError\\)"),
])
def test_header_metadata_of_the_wrong_type(tmp_path, lorakit_meta, match):
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), tmp_path)
    rewrite(tmp_path, metadata={"format": "pt", "lorakit": lorakit_meta})
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path), "adapter_model.safetensors: lorakit's metadata .*"
                  + match)


def test_deeply_nested_config_json(tmp_path):
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path), "adapter_config.json is not valid JSON")


def test_loralib_non_string_keys_and_non_tensors(tmp_path):
    for i, state in enumerate([{3: torch.zeros(2)}, {"fc1.lora_A": [1.0]}, {("fc1", "lora_A"): torch.zeros(2)}]):
        file = tmp_path / f"{i}.pt"
        torch.save({**loralib_seed(), **state}, file)
        fails_cleanly("mlp", lambda m, file=file: lk.load_adapter(m, file, alpha=8),
                      "does not hold a dict of tensors under string keys")


def test_loralib_cannot_overwrite_the_weight_it_adapts(tmp_path):
    torch.save({**loralib_seed(), "fc2.weight": torch.zeros(24, 24)}, tmp_path / "x.pt")
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path / "x.pt", alpha=8),
                  "holds 'fc2.weight', the frozen base weight of a module it adapts")


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_hostile_pattern_keys_do_not_hang(tmp_path, pattern):
    """rank_pattern / alpha_pattern keys from a file: refused or matched, within a bounded time."""
    saved("llama", lk.LoraConfig(r=2, alpha=4, targets=["q_proj"]), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("rank_pattern", "alpha_pattern"):
        rewrite(tmp_path, config={**config, field: {pattern: 2}}, metadata=None)
        start = time.perf_counter()
        fails_cleanly("llama", lambda m: lk.load_adapter(m, tmp_path),
                      f"adapter_config.json: {field} key .* is refused")
        assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_hostile_targets_do_not_hang(pattern):
    start = time.perf_counter()
    for kwargs in (dict(targets=pattern), dict(targets=["q_proj"], exclude=pattern)):
        with pytest.raises(lk.ConfigError, match="is refused"):
            lk.inject(pristine("llama"), lk.LoraConfig(**kwargs))
    assert time.perf_counter() - start < 2.0


def test_ordinary_patterns_keep_peft_matching():
    """PEFT's rule `re.match(rf"(.*\\.)?({key})$", name)`, with literal keys compared as text."""
    from lorakit.config import pattern_key
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "q_proj", "xq_proj"]
    keys = ["q_proj", r"layers\.1\..*", r"model\.layers\.0\.self_attn\.q_proj", "(q|v)_proj", ".*down.*",
            "layers.1.mlp.down_proj", "proj"]
    import re
    for key in keys:
        for name in names:
            assert (pattern_key({key: 1}, name) == key) == bool(re.match(rf"(.*\.)?({key})$", name)), (key, name)


def test_failed_install_rolls_back_and_a_retry_works(tmp_path, monkeypatch):
    """Whatever fails after the adapter is in place, the model ends as it was and the same name loads again."""
    saved("llama", lk.LoraConfig(r=2, alpha=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]), tmp_path)
    import lorakit.io as lio
    real = lio.inject

    def inject_then_fail(model, cfg, name):
        real(model, cfg, name)
        raise RuntimeError("boom")

    for prior in (False, True):
        model = pristine("llama")
        if prior:
            lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]), name="other")
            lk.set_adapter(model, [])
        before = snapshot(model)
        monkeypatch.setattr(lio, "inject", inject_then_fail)
        with pytest.raises(lk.AdapterFileError, match="could not be installed \\(RuntimeError: boom\\); the model is "
                                                     "unchanged"):
            lk.load_adapter(model, tmp_path)
        assert same(snapshot(model), before)
        monkeypatch.setattr(lio, "inject", real)
        lk.load_adapter(model, tmp_path)
        assert adapter_names(model) == (["other"] if prior else []) + ["default"]
        assert active_adapters(model) == ["default"]


def test_adapter_name_with_trailing_newline_is_refused(tmp_path):
    saved("mlp", lk.LoraConfig(r=2, alpha=4, targets=["fc1"]), tmp_path)
    with pytest.raises(lk.ConfigError, match="must be letters, digits"):
        lk.inject(pristine("mlp"), lk.LoraConfig(targets=["fc1"]), name="a\n")
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path, name="a\n"), "must be letters, digits")


# -- atomic saves -------------------------------------------------------------------------------------------
def _save_forever(directory: str, models: list) -> None:
    i = 0
    while True:
        lk.save_adapter(models[i % 2], directory)
        i += 1


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 of a forked saver")
@pytest.mark.parametrize("other_files", [False, True], ids=["adapter-only", "in-place"])
def test_kill_9_during_saves_leaves_a_consistent_pair(tmp_path, other_files):
    """A saver killed at random moments while writing an alpha-8 and an alpha-64 adapter in turn into one
    folder: the folder always loads one whole adapter (A and scale of the same one) or raises AdapterFileError,
    and killed saves' leftovers never pile up."""
    import multiprocessing
    import signal
    folder = tmp_path / "ad"
    models = []
    for alpha, seed in ((8, 1), (64, 2)):
        m = pristine("mlp")
        lk.inject(m, lk.LoraConfig(r=4, alpha=alpha, targets=["fc1"]))
        with torch.no_grad():
            m.fc1.adapters["default"].lora_A.copy_(torch.randn(4, 12, generator=torch.Generator().manual_seed(seed)))
        models.append(m)
    lk.save_adapter(models[0], folder)
    if other_files:
        (folder / "README.md").write_text("not part of the adapter")
    rng = random.Random(0)
    ctx = multiprocessing.get_context("fork")
    outcomes = collections.Counter()
    for _ in range(30):
        proc = ctx.Process(target=_save_forever, args=(str(folder), models), daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        hidden = [p for p in (*tmp_path.iterdir(), *folder.iterdir()) if p.name.startswith(".")]
        assert len(hidden) <= 2, hidden
        model = pristine("mlp")
        try:
            lk.load_adapter(model, folder)
        except lk.AdapterFileError:
            outcomes["refused"] += 1
            continue
        a = model.fc1.adapters["default"]
        which = [i for i, m in enumerate(models) if torch.equal(m.fc1.adapters["default"].lora_A, a.lora_A)]
        assert which and a.scale == models[which[0]].fc1.adapters["default"].scale
        outcomes[which[0]] += 1
    assert outcomes[0] + outcomes[1] > 0, outcomes
    lk.save_adapter(models[1], folder)
    # README.md: lorakit's model card, or in place the user's, which a save keeps
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert ((folder / "README.md").read_text() == "not part of the adapter") == other_files
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_config_from_another_save_is_refused(tmp_path):
    """The window between the two renames of a save: new weights beside the old config."""
    saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), tmp_path / "a")
    saved("mlp", lk.LoraConfig(r=4, alpha=64, targets=["fc1"]), tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.safetensors")
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, tmp_path / "a"),
                  "does not belong with .*'lora_alpha' is 8 in the config but 64 in the copy saved with the weights")
    model = pristine("mlp")
    lk.load_adapter(model, tmp_path / "a", check_base=False)
    assert model.fc1.adapters["default"].scale == 2.0


def test_save_flushes_the_directory_and_clears_stale_temp_files(tmp_path, monkeypatch):
    import stat
    folder = tmp_path / "ad"
    model = saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), folder)
    flushed = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (flushed.append(os.fstat(fd)), real(fd)))
    # a folder holding just an adapter is swapped whole: the parent's entries are flushed last
    (tmp_path / ".ad.new-k1ll3d").mkdir()
    (folder / ".adapter_model.safetensors.abc.tmp").write_text("left by a killed in-place save")
    lk.save_adapter(model, folder)
    assert [stat.S_ISDIR(st.st_mode) for st in flushed] == [False, False, False, True, True]  # + the model card
    assert flushed[-1].st_ino == tmp_path.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # a folder with other files is updated in place: the folder's entries are flushed after the renames
    (folder / "README.md").write_text("mine")
    for name in (".adapter_model.safetensors.abc.tmp", ".adapter_config.json.xyz.tmp"):
        (folder / name).write_text("left by a killed save")
    flushed.clear()
    lk.save_adapter(model, folder)
    assert [stat.S_ISDIR(st.st_mode) for st in flushed] == [False, False, True]
    assert flushed[-1].st_ino == folder.stat().st_ino
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_save_killed_between_the_fallback_renames_is_repaired(tmp_path, monkeypatch):
    """Without an atomic exchange, the old adapter waits in .<name>.old-* while the folder is absent: the
    next save puts it back before writing, and a load meanwhile raises AdapterFileError."""
    import lorakit.io as lio
    folder = tmp_path / "ad"
    model = saved("mlp", lk.LoraConfig(r=4, alpha=8, targets=["fc1"]), folder)
    folder.rename(tmp_path / ".ad.old-k1ll3d")  # where a kill between the two renames leaves it
    fails_cleanly("mlp", lambda m: lk.load_adapter(m, folder), "does not exist.*killed while the previous adapter "
                  "was moved aside: it is in .*\\.ad\\.old-k1ll3d")
    monkeypatch.setattr(lio, "_exchange", lambda a, b: False)
    lk.save_adapter(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    lk.load_adapter(pristine("mlp"), folder)


if __name__ == "__main__":
    if not EXAMPLES:
        sys.exit("set LORAKIT_FUZZ_EXAMPLES=N")
    random.seed(0)
    for kind in ("mlp", "gpt2"):
        test_mutated_adapter_folders(kind)
    test_mutated_loralib_files()
    raw = {k: v for k, v in RECORD.items() if k.startswith("raw: ")}
    print(f"{EXAMPLES} examples per property (3 properties); loaded: {RECORD['loaded']}; "
          f"raw exceptions: {sum(raw.values())} at {len(raw)} distinct sites")
    for k, v in RECORD.most_common():
        print(f"{v:6d}  {k}")


def test_plan_touches_nothing_and_install_later_equals_load(tmp_path):
    from lorakit.io import install_plan, plan_adapter

    source = make("llama")
    lk.inject(source, lk.LoraConfig(r=4, targets="all-linear"))
    randomize(source, std=0.2)
    lk.save_adapter(source, tmp_path / "a")
    model = make("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_adapter(model, tmp_path / "a")
    assert not list(lk.lora_layers(model)) and before.keys() == model.state_dict().keys()
    install_plan(model, plan, "x")
    install_plan(model, plan, "y")  # a plan installs again: its tensors are copied in
    loaded = make("llama")
    lk.load_adapter(loaded, tmp_path / "a", name="x")
    x = example_input("llama")
    for name in ("x", "y"):
        lk.set_adapter(model, name)
        torch.testing.assert_close(run(model, "llama", x), run(loaded, "llama", x), rtol=0, atol=0)
    with pytest.raises(lk.ConfigError, match="already has an adapter named 'x'"):
        install_plan(model, plan, "x")
