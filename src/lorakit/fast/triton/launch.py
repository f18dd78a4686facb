"""Shared by the Triton kernel families: the optional import of Triton, whether it applies to a
tensor, and the launcher that calls compiled kernels directly (with the autotuned launches).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor


try:  # Triton is optional: the PyTorch path computes the same function everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None



# Read once, at import, as Triton reads TRITON_INTERPRET when it decorates the kernels below.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether the kernels may run at all: `lk.set_fast_path(..., triton=False)` keeps the fused Functions on
# their PyTorch steps.
ENABLED = {"on": triton is not None}


def interpreting() -> bool:
    return _INTERPRET


def available_for(t: Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like `t` (CUDA, or CPU under the interpreter)."""
    if not ENABLED["on"]:
        return False
    if t.is_cuda:
        return not _INTERPRET
    return _INTERPRET and t.device.type == "cpu"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in recent Triton, microseconds a call on the host


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots (Triton's default would be tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the CPU interpreter multiplies bfloat16 tiles wrongly (Triton 3.9); float32 there.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)

    # Autotuned launchers for large inputs (many tokens): the best tile shape depends on the shapes and
    # the GPU; small inputs (tests, decode) use fixed configurations.
    def _cfgs(specs, names):
        return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in specs]


_TUNING = {"on": True}

# -- launching ------------------------------------------------------------------------------------
# Triton's own launch (`kernel[grid](...)`) binds and specializes every argument on every call:
# 35-95 us of CPU per launch on the benchmark host, where a LoRA step launches ~180 kernels.
# Once a kernel was compiled for a specialization, `_launch` calls the compiled kernel directly.
# Its cache key is finer than Triton's own (every property Triton specializes an argument on, and
# then some), so it can only miss where Triton would hit, never reuse a kernel Triton would not.
_COMPILED: dict = {}
try:  # host-side tile descriptors for the copy engine (Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor as _DESCRIPTOR
except ImportError:  # pragma: no cover - depends on the Triton version
    _DESCRIPTOR = None
# Triton's TensorDescriptor checks its fields on construction (microseconds); `expand_gemm_ok` has made
# the same checks, so `_descriptor` sets the fields directly where the class is the plain dataclass of
# these fields (Triton 3.4 to 3.9), else it calls `from_tensor`.
_DESC_FIELDS = None
if _DESCRIPTOR is not None and dataclasses.is_dataclass(_DESCRIPTOR) and not hasattr(_DESCRIPTOR, "__slots__"):
    _fields = {f.name: f.default for f in dataclasses.fields(_DESCRIPTOR)}
    if {"base", "shape", "strides", "block_shape"} <= set(_fields) and all(
            v is not dataclasses.MISSING for k, v in _fields.items() if k not in ("base", "shape", "strides",
                                                                                  "block_shape")):
        _DESC_FIELDS = {k: v for k, v in _fields.items() if k not in ("base", "shape", "strides", "block_shape")}


def _descriptor(t: Tensor, block: list[int]):
    """TensorDescriptor.from_tensor(t, block), without repeating the checks of `expand_gemm_ok`."""
    if _DESC_FIELDS is None:
        return _DESCRIPTOR.from_tensor(t, block)
    d = _DESCRIPTOR.__new__(_DESCRIPTOR)
    d.__dict__.update(_DESC_FIELDS)
    d.base, d.shape, d.strides, d.block_shape = t, t.shape, t.stride(), block
    return d


def _same_as_from_tensor() -> bool:
    """Whether `_descriptor` gives what `from_tensor` gives (the same attributes, equal values), on a probe."""
    try:
        t = torch.zeros(16, 16, dtype=torch.float16)
        mine, theirs = vars(_descriptor(t, [16, 16])), vars(_DESCRIPTOR.from_tensor(t, [16, 16]))
        return mine.keys() == theirs.keys() and all(
            mine[k] is theirs[k] or (k != "base" and mine[k] == theirs[k]) for k in mine)
    except Exception:  # noqa: BLE001 - any surprise: use from_tensor
        return False


if _DESC_FIELDS is not None and not _same_as_from_tensor():  # pragma: no cover - depends on the Triton version
    _DESC_FIELDS = None
_DIRECT = {"on": True}  # False: every launch through Triton's own launcher (kernels under a debugger)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _specs(args: tuple) -> tuple:
    """What Triton specializes each argument on (and then some): a tensor's dtype and 16-byte alignment,
    an int's value if 0 or 1 else its divisibility by 16 and whether it fits 32 bits; float: nothing."""
    out = []
    add = out.append
    for a in args:
        t = type(a)
        if t is int:
            add(a if a == 0 or a == 1 else (a & 15 == 0, -2147483648 <= a < 2147483648))
        elif t is float:
            add(None)
        elif t is _DESCRIPTOR:  # compiled for its dtype and tile, not its sizes
            b = a.base
            add((b.dtype, b.data_ptr() & 15 == 0, *a.block_shape, a.padding))
        elif isinstance(a, Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        else:
            add((t, a))
    return tuple(out)


def _key(kernel, device: torch.device, args: tuple, consts: dict) -> tuple:
    """A direct launch's entry in `_COMPILED`: the kernel, the device, what Triton specializes the arguments on
    and the constants in call order (the same constants in another order only miss, then hit Triton's own
    cache)."""
    return kernel, device, _specs(args), tuple(consts.items())


def _launch(kernel, grid: tuple, args: tuple, consts: dict) -> None:
    """kernel[grid](*args, **consts), by the compiled kernel's own launcher once Triton has compiled it."""
    first = args[0].base if _DESCRIPTOR is not None and type(args[0]) is _DESCRIPTOR else args[0]
    if not (_DIRECT["on"] and first.is_cuda):
        kernel[grid](*args, **consts)
        return
    key = _key(kernel, first.device, args, consts)
    hit = _COMPILED.get(key)
    if hit is not None:
        compiled, args = hit[0], args + hit[1]
        grid = grid + (1,) * (3 - len(grid))  # the compiled kernel's launcher reads 3 dims
        if _RUNTIME:
            _run(compiled, grid, args)
        else:
            compiled[grid](*args)
        return
    compiled = kernel[grid](*args, **consts)
    names = kernel.arg_names[len(args):]
    if hasattr(compiled, "run") and all(n in consts for n in names) \
            and len(consts) == len(names) + sum(o in consts for o in _OPTIONS):
        _COMPILED[key] = (compiled, tuple(consts[n] for n in names))
        if _RUNTIME is None:
            _resolve_runtime(compiled)


# (get_current_device, get_current_stream, the runtime knobs) of Triton's active driver, looked up on the
# first direct launch; () where this Triton's compiled kernels do not have the launcher they expect.
_RUNTIME = None


def _run(compiled, grid: tuple, args: tuple) -> None:
    """What `compiled[grid](*args)` does (grid of 3), with Triton's device and stream functions looked up once."""
    get_device, get_stream, rt = _RUNTIME
    stream = get_stream(get_device())
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *args), rt.launch_enter_hook, rt.launch_exit_hook, *args)


def _resolve_runtime(compiled) -> None:
    global _RUNTIME
    try:
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        found = (active.get_current_device, active.get_current_stream, knobs.runtime)
        ok = all(hasattr(compiled, a) for a in ("function", "packed_metadata", "launch_metadata")) \
            and hasattr(knobs.runtime, "launch_enter_hook") and hasattr(knobs.runtime, "launch_exit_hook")
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton version
        found, ok = (), False
    _RUNTIME = found if ok else ()


def _tune(M: int, t: Tensor) -> bool:
    return _TUNING["on"] and M >= 4096 and t.is_cuda and not interpreting()


_BEST: dict = {}  # (kernel, tuning key) -> the triton.Config its autotuner chose


def _tuned(tuner, kernel, key: tuple, grid, args: tuple, consts: dict, fallback) -> None:
    """Launch `kernel` with the configuration `tuner` (its autotuned form) picks for `key`.

    The first launch per key goes through the autotuner (benchmarking the configurations);
    later ones launch the chosen configuration directly, which skips the autotuner's
    per-call argument handling (about half the CPU cost of a launch). If autotuning itself
    fails: warn once and use the fixed configuration (`fallback`) from then on.
    """
    cfg = _BEST.get((kernel, key))
    if cfg is not None:
        _launch(kernel, grid(cfg.kwargs), args,
                {**consts, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        return
    try:
        tuner[grid](*args, **consts)
    except Exception as e:  # a failed tuning run must not take the fast path down with it
        import warnings

        warnings.warn(f"lorakit: Triton autotuning failed ({type(e).__name__}: {e}); using fixed tile sizes.")
        _TUNING["on"] = False
        fallback()
        return
    best = getattr(tuner, "best_config", None)
    if best is not None:
        _BEST[(kernel, key)] = best


_SM: dict = {}
_ZERO_SEEDS: dict = {}


def _zero_seed(device: torch.device) -> Tensor:
    seed = _ZERO_SEEDS.get(device)
    if seed is None:
        seed = _ZERO_SEEDS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return seed



def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM:
        _SM[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM[device]
