"""Inference with few rows (decode): the fused one-launch kernel (`lora_small`), the base GEMM, the
LoRA shrink and expand in one kernel, and `SmallPlan`, the call repeated with its checks done once."""

from __future__ import annotations

import torch
from torch import Tensor

from . import launch
from .launch import (_COMPILED, _DIRECT, _cdiv, _key, _launch, _pow2, _prec, _run, _sm_count, interpreting, tl,
                     triton)


if triton is not None:
    from .launch import _dot

    @triton.jit
    def _x_and_w_tiles(x_ptr, w_ptr, rm, rn, rk, m_ok, n_ok, k_ok, stride_xm, stride_wn, stride_wk):
        # The (BM, BK) tile of x (unit stride in K) and the (BK, BN) tile of W.T (W (N, K) of any strides).
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        return xt, wt

    @triton.jit
    def _small_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                    stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om, blk, pid_n, pid_s, pid_m,
                    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # y (M, N) = x @ W.T + bias + scale * (x @ A.T) @ B.T for few rows M (decode): the share of
        # column block `blk`, K split pid_s and row block pid_m (program pid_n of the launch's column blocks).
        # It streams the (BN, KC) block of W at columns pid_s*KC.. and the same columns of the small A
        # (from L2); both products are linear in x, so its share of y is
        #     x_s @ W_s.T + scale * (x_s @ A_s.T) @ B.T         (xa kept float32, its B product in ieee float32)
        # A and B of another dtype than x (float32 adapters on a bfloat16 model) are rounded to x's dtype as
        # they are read, as `A.to(x.dtype)` would round them.
        # With SPLIT > 1 the shares go to a float32 workspace; the last program of a tile to finish
        # (a counter per tile) adds them in the order s = 0, 1, .. (deterministic), rounds once,
        # writes y and sets the counter back to 0 for the next launch.
        rn = blk * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        n_ok = rn < N
        m_ok = rm < M
        r_ok = rr < R
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        xa = tl.zeros((BM, BR), dtype=tl.float32)
        k_hi = tl.minimum(pid_s * KC + KC, K)
        for k_start in range(pid_s * KC, k_hi, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < k_hi
            xt, wt = _x_and_w_tiles(x_ptr, w_ptr, rm, rn, rk, m_ok, n_ok, k_ok, stride_xm, stride_wn, stride_wk)
            at = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None], mask=r_ok[None, :] & k_ok[:, None],
                         other=0.0).to(x_ptr.dtype.element_ty)
            acc = _dot(xt, wt, acc, PREC, UPCAST)
            xa = _dot(xt, at, xa, PREC, UPCAST)
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc += scale * tl.dot(xa, bt.to(x_ptr.dtype.element_ty).to(tl.float32), input_precision="ieee")
        _small_finish(acc, rm, rn, m_ok, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
                      pid_n, pid_s, pid_m, SPLIT, HAS_BIAS, BM, BN)

    @triton.jit
    def _gemv_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, R, scale, KC,
                   stride_wn, stride_wk, stride_am, stride_bn, stride_om, blk, pid_n, pid_s,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   BR: tl.constexpr):
        # `_small_tile` for one row (M == 1): products as float32 multiply-adds on whole (BN, BK) tiles
        # of W, summed over K at the end, instead of tensor-core dots padded to 16 rows.
        rn = blk * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        n_ok = rn < N
        r_ok = rr < R
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        xa = tl.zeros((BR, BK), dtype=tl.float32)
        k_hi = tl.minimum(pid_s * KC + KC, K)
        for k_start in range(pid_s * KC, k_hi, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < k_hi
            xk = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk,
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wt.to(tl.float32) * xk[None, :]
            xa += at.to(x_ptr.dtype.element_ty).to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        xs = tl.sum(xa, axis=1)
        bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        y += scale * tl.sum(bt.to(x_ptr.dtype.element_ty).to(tl.float32) * xs[None, :], axis=1)
        rm = tl.arange(0, 1)
        _small_finish(y[None, :], rm, rn, rm < 1, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, 1, N, stride_om,
                      pid_n, pid_s, 0, SPLIT, HAS_BIAS, 1, BN)

    @triton.jit
    def _lora_small_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                           stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om,
                           SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # One linear, few rows: program (n, s, m) computes `_small_tile`'s share for column block n.
        pid_n = tl.program_id(0)
        _small_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                    stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om, pid_n, pid_n,
                    tl.program_id(1), tl.program_id(2), SPLIT, HAS_BIAS, PREC, UPCAST, BM, BN, BK, BR)

    @triton.jit
    def _small_finish(acc, rm, rn, m_ok, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
                      pid_n, pid_s, pid_m, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr):
        # Writes y's (BM, BN) tile: this program's float32 share acc, plus (SPLIT > 1) the other splits'.
        io_ok = m_ok[:, None] & n_ok[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=io_ok)
        else:
            tile = rm[:, None] * N + rn[None, :]
            tl.store(ws_ptr + pid_s * M * N + tile, acc, mask=io_ok)
            tl.debug_barrier()  # every thread's share is written before the counter says so
            cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                tl.debug_barrier()
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for q in range(SPLIT):
                    total += tl.load(ws_ptr + q * M * N + tile, mask=io_ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=io_ok)
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _lora_gemv_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                          stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          BR: tl.constexpr):
        # One linear, one row (M == 1): program (n, s) computes `_gemv_tile`'s share for column block n.
        pid_n = tl.program_id(0)
        _gemv_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, R, scale, KC,
                   stride_wn, stride_wk, stride_am, stride_bn, stride_om, pid_n, pid_n, tl.program_id(1),
                   SPLIT, HAS_BIAS, BN, BK, BR)


# Few rows (decode): the fused one-launch kernel serves up to this many; above, the base GEMM is
# compute-bound enough that cuBLAS for it wins. ops.py and routed.py read it here at call time (one knob).
SMALL_MAX_ROWS = 64
_SMALL_CFGS: dict = {}
_COUNTERS: dict = {}
_OUTGROWN: list = []


def _small_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes for `lora_small`, as the H100 sweep of benchmarks/bench_decode.py found fastest for
    the Llama linears: one row (multiply-add kernel) wants about three programs per SM (column
    blocks x K splits), more rows (tensor-core dots) about one; each program gets at least two BK steps."""
    key = (M == 1, N, K, device)
    c = _SMALL_CFGS.get(key)
    if c is None:
        BN = 16 if N <= 512 else 64
        BK = 128
        split = _small_split(M, _cdiv(N, BN), K, BK, device)
        c = _SMALL_CFGS[key] = {"BN": BN, "BK": BK, "SPLIT": split, "num_warps": 4, "num_stages": 3}
    return c


def _small_split(M: int, blocks: int, K: int, BK: int, device: torch.device) -> int:
    """K splits for `blocks` column blocks: about three programs per SM for one row, one for more rows."""
    sms = _sm_count(device)
    want = (3 * sms + blocks // 2) // blocks if M == 1 else sms // blocks
    return max(1, min(want, K // (2 * BK)))


def _k_chunks(K: int, BK: int, split: int) -> tuple[int, int]:
    """(KC, splits): K cut into at most `split` chunks of KC columns, a multiple of BK, none of them empty."""
    split = max(1, min(split, _cdiv(K, BK)))
    KC = _cdiv(_cdiv(K, split), BK) * BK
    return KC, _cdiv(K, KC)


def _counters(device: torch.device, n: int) -> Tensor:
    """Zeroed int32 tile counters for `lora_small`'s split reduction, one buffer per device and stream
    (every launch leaves them at zero again; two streams must not share them). A buffer outgrown is
    kept alive: a captured CUDA graph may still point into it."""
    key = (device, _stream_handle(device) if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(n, 16384), dtype=torch.int32, device=device)
    if (device, "compiled") not in _COUNTERS and device.type == "cuda" \
            and not torch.cuda.is_current_stream_capturing():
        _COUNTERS[(device, "compiled")] = torch.zeros(16384, dtype=torch.int32, device=device)
    return buf


def _workspace(device: torch.device, n: int) -> Tensor:
    """A float32 scratch buffer of at least n elements for the split-K partial sums of `SmallPlan` launches,
    one per device and stream, grown as needed. Launches on one stream run one after another, and each
    reads back what it wrote before it ends, so they can share it; a plan keeps the buffer it was made
    with alive."""
    key = (device, _stream_handle(device), "ws")
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.empty(max(n, 1 << 16), dtype=torch.float32, device=device)
    return buf


def _stream_handle(device: torch.device) -> int:
    """The current CUDA stream of `device` as its raw handle (what Triton reads for every launch: a
    fraction of the cost of a `torch.cuda.Stream` object). Two live streams never share a handle."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:  # pragma: no cover - every CUDA build of PyTorch has it
        return torch.cuda.current_stream(device).cuda_stream
    return raw(device.index if device.index is not None else torch.cuda.current_device())


def compiled_counters(device: torch.device, n: int) -> Tensor | None:
    """A zeroed counter buffer for the graphs torch.compile captures, or None. It was made by an eager
    call outside any CUDA graph (a graph may keep pointing into it, but may not allocate it in its own
    pool). Compiled calls replay one after another on one stream, and each leaves it at zero again."""
    buf = _COUNTERS.get((device, "compiled"))
    return buf if buf is not None and buf.numel() >= n else None


def _small_setup(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                 cfg: dict | None = None):
    """(kernel, grid, split, consts, args(out, ws, cnt)) of one `lora_small` launch."""
    M, K = x2.shape
    N = weight.shape[0]
    R = A.shape[0]
    BM = min(_pow2(M), 64)
    c = _small_config(M, N, K, x2.device)
    if cfg:
        c = dict(c, **cfg)
    BK = min(c["BK"], _pow2(K))
    KC, split = _k_chunks(K, BK, c["SPLIT"])
    grid = (_cdiv(N, c["BN"]), split, _cdiv(M, BM))
    if M == 1 and c.get("GEMV", True):
        kernel, consts = _lora_gemv_kernel, dict(SPLIT=split, HAS_BIAS=bias is not None, BN=c["BN"], BK=BK,
                                                 BR=_pow2(R), num_warps=c["num_warps"], num_stages=c["num_stages"])
    else:
        kernel, consts = _lora_small_kernel, dict(
            SPLIT=split, HAS_BIAS=bias is not None, PREC=_prec(x2.dtype), UPCAST=interpreting(), BM=BM, BN=c["BN"],
            BK=BK, BR=_pow2(R), num_warps=c["num_warps"], num_stages=c["num_stages"])
    fixed = (M, N, K, R, float(scale), KC, x2.stride(0), weight.stride(0), weight.stride(1), A.stride(0), B.stride(0),
             N)

    def args(out, ws, cnt):
        return (x2, weight, x2 if bias is None else bias, A, B, out, ws, cnt, *fixed)
    return kernel, grid, split, consts, args


def lora_small(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
               cfg: dict | None = None, fresh_counters: bool = False, compiled: bool = False) -> Tensor:
    """y = x2 @ weight.T + bias + scale * (x2 @ A.T) @ B.T as a new (M, N) tensor, in one launch (M small).

    x2 (M, K), A (R, K), B (N, R), bias (N,) or None: unit stride in the last dimension; weight (N, K)
    any strides (a transposed (K, N) weight, as GPT-2's Conv1D keeps it, is read in place). A and B may
    be of another dtype than x2 (float32 adapters): the kernel rounds them to x2's dtype as it reads them,
    the bits of `lora_small(x2, ..., A.to(x2.dtype), B.to(x2.dtype), ...)`. `cfg`
    overrides the tile sizes (benchmarks). `fresh_counters`: zeroed tile counters of the call's own
    (one small fill more) instead of the buffer kept across calls, which torch.compile's CUDA graphs
    refuse when it was allocated in their memory pool. `compiled`: the counters of `compiled_counters`
    where they exist, else fresh ones.
    """
    M, N = x2.shape[0], weight.shape[0]
    if M == 0:
        return torch.empty(0, N, dtype=x2.dtype, device=x2.device)
    kernel, grid, split, consts, args = _small_setup(x2, weight, bias, A, B, scale, cfg)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x2.device) if split > 1 else out
    kept = compiled_counters(x2.device, grid[0] * grid[2]) if compiled and split > 1 else None
    if split == 1:
        cnt = out
    elif kept is not None:
        cnt = kept
    elif fresh_counters or compiled:
        cnt = torch.zeros(grid[0] * grid[2], dtype=torch.int32, device=x2.device)
    else:
        cnt = _counters(x2.device, grid[0] * grid[2])
    _launch(kernel, grid, args(out, ws, cnt), consts)
    return out


class SmallPlan:
    """`lora_small` for one call site (an adapted linear in eager decode), worked out once.

    On the device hosts an eager decode call of an adapted linear took about 90 µs of CPU, against 25 µs
    for the base model's `nn.Linear`: checks and tile arithmetic in `lora_linear` and `lora_small`, two
    allocations and the launch's cache key, every token. A plan keeps what those compute (tile sizes,
    grid, the compiled kernel, a workspace and counters of its own stream) and `__call__` launches the
    kernel directly, with the tensors it is given. It serves only operands of the layout it was made for
    (device, shape, strides, dtype and 16-byte alignment of the input, weight, bias, A and B) and the same
    scale, on the same stream, outside CUDA graph capture; for anything else it returns None and the
    caller takes the general path. It holds no reference to the operands.
    """

    __slots__ = ("shape", "stride", "dtype", "aligned", "index", "layout", "scale", "stream", "device",
                 "out_shape", "grid", "split", "fixed_args", "compiled", "tail", "ws", "cnt")

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                 scale: float) -> Tensor | None:
        if not (scale == self.scale and _fits(self, x) and self.layout == _layout(weight, bias, A, B)):
            return None
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        ws, cnt = (self.ws, self.cnt) if self.split > 1 else (out, out)
        _run(self.compiled, self.grid, (x, weight, x if bias is None else bias, A, B, out, ws, cnt, *self.fixed_args,
                                        *self.tail))
        return out

    def __reduce__(self):  # a copied or pickled module gets no plan (it holds a compiled kernel)
        return _none, ()

    def __deepcopy__(self, memo):
        return None


def _fits(plan, x: Tensor) -> bool:
    """Whether a plan's launch serves input x now: x's shape, strides, dtype, 16-byte alignment and device as
    when the plan was made, the same current stream, no CUDA graph capture and no autocast."""
    return (x.shape == plan.shape and x.dtype == plan.dtype and x.stride() == plan.stride
            and (x.data_ptr() & 15 == 0) == plan.aligned and x.get_device() == plan.index
            and _stream_handle(plan.device) == plan.stream and not torch.cuda.is_current_stream_capturing()
            and not torch.is_autocast_enabled("cuda"))


def _plan_for(plan, x: Tensor):
    """Fill the fields `_fits` reads from x and the current stream; returns the plan."""
    plan.shape, plan.stride, plan.dtype, plan.aligned = x.shape, x.stride(), x.dtype, x.data_ptr() & 15 == 0
    plan.device, plan.index, plan.stream = x.device, x.get_device(), _stream_handle(x.device)
    return plan


def _layout(weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> tuple:
    """What a launch is made for besides the input: each operand's device, shape, strides, dtype and 16-byte
    alignment. The launch reads the tensors it is given, so any tensors of this layout are served right."""
    return tuple(None if t is None else (t.get_device(), t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0)
                 for t in (weight, bias, A, B))


def _none() -> None:
    return None


def small_plan(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> SmallPlan | None:
    """A `SmallPlan` for calls like `lora_small(x.reshape(-1, in), weight, bias, A, B, scale)`, once that call
    has run (compiled the kernel), or None where the direct launch does not serve (see `_launch`)."""
    if not (_DIRECT["on"] and launch._RUNTIME and x.is_cuda and x.is_contiguous()):
        return None
    x2 = x.view(-1, x.shape[-1])
    M, N = x2.shape[0], weight.shape[0]
    if M == 0 or torch.cuda.is_current_stream_capturing():
        return None
    kernel, grid, split, consts, args = _small_setup(x2, weight, bias, A, B, scale)
    device = x.device
    ws = _workspace(device, split * M * N) if split > 1 else None
    cnt = _counters(device, grid[0] * grid[2]) if split > 1 else None
    out = torch.empty(M, N, dtype=x.dtype, device=device)
    full = args(out, ws if ws is not None else out, cnt if cnt is not None else out)
    hit = _COMPILED.get(_key(kernel, device, full, consts))
    if hit is None:
        return None
    plan = _plan_for(SmallPlan(), x)
    plan.layout = _layout(weight, bias, A, B)
    plan.scale = scale
    plan.out_shape = (*x.shape[:-1], N)
    plan.grid = grid + (1,) * (3 - len(grid))
    plan.split, plan.ws, plan.cnt = split, ws, cnt
    plan.fixed_args = full[8:]
    plan.compiled, plan.tail = hit
    return plan
