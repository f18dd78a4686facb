"""LoRA on quantized base layers: bitsandbytes' `Linear4bit` (NF4, FP4) and `Linear8bitLt` (QLoRA).

The quantized weight never changes and never gets gradients; the adapters are float32 and their
term is the one of `lorakit.functional`; the base term is the quantized layer's own forward:

    y = base_q(x) + sum over active adapters a of  a.scale * B_a @ A_a @ dropout_a(x)

Merging into 4 or 8 bits would round most of an update away, so a quantized layer refuses
`merge`; `eject(model, merge=True)` instead writes a plain nn.Linear whose weight is
dequantize(Wq) + scale * B @ A, computed in float32 and rounded once into the dequantized dtype.

bitsandbytes is imported only when a quantized layer is dequantized (it is not a core dependency).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast
from . import functional as LF
from .errors import MergeError, TargetError
from .layers import LoraLinear

# Layer classes of bitsandbytes that LoraQuantLinear adapts, by class name (bitsandbytes is not imported
# to recognize them: a model holding them has imported it already).
BNB_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
SUPPORTED = "bitsandbytes Linear4bit (NF4, FP4, with or without double quantization) and Linear8bitLt"


def is_bnb_linear(module: nn.Module) -> bool:
    """A bitsandbytes quantized linear layer that LoRA can adapt."""
    return any(c.__name__ in BNB_LINEARS and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized(module: nn.Module) -> bool:
    """A module whose weight is stored in an integer dtype (quantized by some library)."""
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and not (w.is_floating_point() or w.is_complex())


def check_supported(module: nn.Module, path: str) -> None:
    """Raises TargetError for a quantized module that is not a supported bitsandbytes layer.

    Raises:
        TargetError: `module` holds an integer weight and is not one of `SUPPORTED`.
    """
    if is_quantized(module) and not (is_bnb_linear(module) or isinstance(module, LoraLinear)):
        raise TargetError(
            f"{path} is a {type(module).__module__}.{type(module).__name__} with a quantized "
            f"{module.weight.dtype} weight, which LoRA cannot adapt here (supported quantized layers: {SUPPORTED}, "
            "as transformers' BitsAndBytesConfig loads them). Load the model with BitsAndBytesConfig or in 16 bits, "
            "or exclude this module from the targets."
        )


def merge_refused(path: str, name: str) -> MergeError:
    """The error of `lk.merge` on a quantized layer."""
    return MergeError(
        f"Cannot merge adapter {name!r} into {path}: its weight is quantized (bitsandbytes), and merging into "
        "4 or 8 bits would round most of the update away; no weight was changed. Keep the adapter unmerged "
        "(it serves as is), or write a 16-bit model with lk.eject(model, merge=True) or `lorakit merge`, "
        "whose weights are dequantize(Wq) + scale * B @ A."
    )


def dequantize(layer: nn.Module) -> Tensor:
    """The weight that a bitsandbytes layer's `weight` stands for: (out, in) in its dequantized dtype
    (the dtype the model was quantized from for 4 bits; float16 for 8 bits)."""
    import bitsandbytes.functional as bnb_f

    w = layer.weight
    if getattr(w, "quant_state", None) is not None:  # Params4bit: packed (out*in/2, 1) uint8
        return bnb_f.dequantize_4bit(w.data, w.quant_state)
    # Int8Params: CB (out, in) int8 and one absmax scale per row, SCB (out,)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return bnb_f.int8_vectorwise_dequant(w.data, scb).to(torch.float16)


class LoraQuantLinear(LoraLinear):
    """LoRA on a bitsandbytes quantized linear layer (weight packed, not (out, in)).

    The base module keeps its parameters (the wrapper holds the same ones under the same names), so
    its own forward computes the base term and its own state_dict hook writes the quantization
    state (absmax, quant_map, ...) under the base model's keys.
    """

    quantized = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        for pname in self._base_params:  # give them back: bitsandbytes' forward reads them there
            base._parameters[pname] = getattr(self, pname)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: Tensor) -> Tensor:
        adapter = self._fused_adapter(x)
        if adapter is None:
            return super(LoraLinear, self).forward(x)  # the reference path: base_q(x) + each adapter's term
        A, B, scale, p = adapter.operands()
        dtype = getattr(self._base, "compute_dtype", None) or x.dtype
        if not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)):
            # inference: bitsandbytes' own kernel for the base term (a matrix-vector kernel on packed
            # weights for one token), then the adapter term added in place in the compute dtype
            y = self._base(x)
            A, B = self._cast_operands(A, B, dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            y2 = y.view(-1, y.shape[-1])
            y2.addmm_((x2 @ A.t()).to(y2.dtype), B.t().to(y2.dtype), alpha=scale)
            return y
        seed = LF.dropout_seed(x.device) if p > 0 and adapter.training else None
        return _QuantLoraFunction.apply(x, A, B, self.bias, self._base, scale, p if seed is not None else 0.0,
                                        seed, dtype)

    def _fused_adapter(self, x: Tensor):
        """The one adapter the fused path computes for `x`, or None where the reference path runs: the fast
        path off for x, the layer disabled or routed, not exactly one unmerged active adapter, a base that
        is not 4-bit, a trainable bias, or a sliced adapter."""
        if self.disabled or self.routing is not None or not fast.enabled_for(x):
            return None
        if getattr(self._base.weight, "quant_state", None) is None:  # 8 bits: its own int8 kernels
            return None
        adapters = self._unmerged_active()
        if len(adapters) != 1 or adapters[0].slices is not None:
            return None
        if self.bias is not None and self.bias.requires_grad:
            return None
        return adapters[0]

    def _cast_operands(self, A: Tensor, B: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A and B in `dtype`, cast once per change of either (keyed on their version counters)."""
        key = (dtype, A.data_ptr(), A._version, B.data_ptr(), B._version)
        cache = self.__dict__.get("_cast")
        if cache is None or cache[0] != key:
            cache = self.__dict__["_cast"] = (key, A.detach().to(dtype), B.detach().to(dtype))
        return cache[1], cache[2]

    def unwrap(self) -> nn.Module:
        return self._base

    def adapter_dtype(self) -> torch.dtype:
        return torch.float32

    def weight_out_in(self) -> Tensor:
        return dequantize(self._base)

    def _base_forward(self, x: Tensor) -> Tensor:
        return self._base(x)

    def _adapter_forward(self, x: Tensor, a) -> Tensor:
        # float32 adapters on an input of the compute dtype: the term is computed in the adapter's dtype
        # and returned in the input's, as the base term is
        return super()._adapter_forward(x.to(a.lora_A.dtype), a).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self._base._save_to_state_dict(destination, prefix, keep_vars)

    def merge(self, name: str, module_name: str = "") -> None:
        """Refused: see `merge_refused`.

        Raises:
            MergeError: always, when `name` is an adapter of this layer.
        """
        if name in self.adapters:
            raise merge_refused(module_name or type(self._base).__name__, name)

    def dequantized_twin(self) -> LoraLinear:
        """A LoraLinear over a new nn.Linear holding dequantize(Wq) (and the bias), sharing this layer's
        adapters and active set: what merging on a 16-bit copy of this layer starts from."""
        weight = dequantize(self._base)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(False)
        twin = LoraLinear(linear)
        for n, a in self.adapters.items():
            twin.adapters[n] = a
        twin.active = list(self.active)
        twin.train(self.training)
        return twin


class _QuantLoraFunction(torch.autograd.Function):
    """y = x @ dequantize(Wq).T + bias + scale * (dropout(x) @ A.T) @ B.T for a 4-bit base, in training.

    The 16-bit weight exists only inside forward and inside backward (dequantized again there), never
    across the step. Saved for backward: x (the same storage as the layer's input, so siblings reading one
    input share it), xa = dropout(x) @ A.T (rows, r) and the dropout seed; the mask is drawn again from the
    seed (`lorakit.functional.dropout_keep`), so no dropped copy of x is kept.
    """

    @staticmethod
    def forward(ctx, x, A, B, bias, base, scale, p, seed, dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        weight = dequantize(base).to(dtype)
        y = F.linear(x2, weight, None if bias is None else bias.to(dtype))
        del weight
        triton = _triton_for(x2)
        if triton is not None:  # the mask drawn in registers: no dropped copy of x2 is written
            xa = triton.shrink(x2, A.to(dtype), seed, p)
        else:
            xa = LF.seeded_dropout(x2, seed, p) @ A.to(dtype).t()
        y.addmm_(xa, B.to(dtype).t(), alpha=scale)
        ctx.save_for_backward(x2, xa, A, B, seed)
        ctx.base, ctx.scale, ctx.p, ctx.dtype, ctx.x_shape, ctx.x_dtype = base, scale, p, dtype, x.shape, x.dtype
        ctx.triton = triton is not None
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x2, xa, A, B, seed = ctx.saved_tensors
        dtype, scale, p = ctx.dtype, ctx.scale, ctx.p
        g2 = gy.reshape(-1, gy.shape[-1]).to(dtype).contiguous()
        if ctx.triton:
            return _QuantLoraFunction._backward_triton(ctx, g2, x2, xa, A, B, seed)
        gxa = (g2 @ B.to(dtype)).mul_(scale)  # (rows, r)
        gx = gA = gB = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(ctx.base).to(dtype)
            gx = g2 @ weight
            del weight
            # dropout's backward is dropout with the same mask and the same 1 / (1 - p)
            gx += LF.seeded_dropout(gxa @ A.to(dtype), seed, p)
            gx = gx.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gA = (gxa.t() @ LF.seeded_dropout(x2, seed, p)).to(A.dtype)
        if ctx.needs_input_grad[2]:
            gB = (g2.t() @ xa).mul_(scale).to(B.dtype)
        return gx, gA, gB, None, None, None, None, None, None

    @staticmethod
    def _backward_triton(ctx, g2, x2, xa, A, B, seed):
        """The backward with the fast path's kernels: g read once for scale * g @ B and dB, then one pass for
        dA and the adapter's share of gx (the mask regenerated in registers), added onto g @ W."""
        from .fast import triton as _triton

        dtype, scale, p = ctx.dtype, ctx.scale, ctx.p
        gxa = torch.empty(g2.shape[0], B.shape[1], dtype=dtype, device=g2.device)
        gB = _triton.lora_grads(g2, B.to(dtype), xa, scale, gxa, db_dtype=B.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            weight = dequantize(ctx.base).to(dtype)
            gx = g2 @ weight
            del weight
        gA = _triton.dropout_backward(x2, gxa, A.to(dtype).contiguous(), gx, seed, p).to(A.dtype)
        if gx is not None:
            gx = gx.view(ctx.x_shape).to(ctx.x_dtype)
        return (gx, gA if ctx.needs_input_grad[1] else None, gB if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None)


def _triton_for(x2: Tensor):
    """The fast path's Triton kernels where they run on x2 (CUDA, or the CPU under the interpreter) and
    the mode allows them, else None."""
    from .fast import triton as _triton

    return _triton if _triton.available_for(x2) and not torch.compiler.is_compiling() else None


QUANTIZE = ("nf4", "fp4", "int8")


def bnb_config(kind: str, compute_dtype: torch.dtype | None = None):
    """transformers' BitsAndBytesConfig for `kind`: "nf4" / "fp4" (4 bits, double quantization, compute in
    `compute_dtype`, default float32) or "int8" (8 bits).

    Raises:
        ConfigError: an unknown kind, or bitsandbytes missing or older than 0.45.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .errors import ConfigError

    if kind not in QUANTIZE:
        raise ConfigError(f"quantize={kind!r} is not a quantization lorakit knows; use one of {', '.join(QUANTIZE)}.")
    try:
        have = version("bitsandbytes")
    except PackageNotFoundError:
        have = None
    if have is None or tuple(int(p) for p in have.split(".")[:2] if p.isdigit()) < (0, 45):
        raise ConfigError(f"quantize={kind!r} needs bitsandbytes >= 0.45 ({'not installed' if have is None else have} "
                          "here): pip install 'bitsandbytes>=0.45', or load the model without quantizing.")
    import transformers

    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=compute_dtype or torch.float32)


def dequantize_model(model: nn.Module) -> nn.Module:
    """A transformers model loaded with bitsandbytes, with every remaining quantized linear dequantized and the
    quantization config removed (what `lorakit merge --quantize` writes after `eject(model, merge=True)`)."""
    if any(is_bnb_linear(m) for m in model.modules()):
        return model.dequantize()
    model.hf_quantizer.remove_quantization_config(model)  # transformers' dequantize needs a quantized layer
    return model


def update_of(layer: LoraLinear, names: list[str]) -> Tensor:
    """sum over `names` of scale * B @ A on `layer`, float32 (out, in): the update a merge adds."""
    device = next(iter(layer.adapters.values())).lora_A.device
    out = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32, device=device)
    for n in names:
        a = layer.adapters[n]
        out += a.scale * (a.lora_B.float() @ a.lora_A.float())
    return out


def requantize_loss(layers: dict[str, LoraLinear], active: list[str], merged: nn.Module,
                    requantized: nn.Module) -> dict[str, float]:
    """What quantizing a merged model again costs, over the layers that carried an update.

    `layers` are the quantized LoRA layers of the model before its merge (path -> layer; each still holds
    its quantized base and its adapters), `merged` the 16-bit model whose weights are dequantize(Wq) + U
    (U = the active adapters' update), `requantized` the same model loaded quantized again. Returns the max
    and mean absolute error of the requantized weights against the merged ones, and the fraction of U
    that survives each way, <W - dequantize(Wq), U> / <U, U> summed over layers, for the requantized
    weights (`update_kept`) and for the 16-bit merged ones (`update_kept_16bit`, below 1 only by the one
    rounding into 16 bits).
    """
    err_max, err_sum, count, dot_q, dot_m, norm = 0.0, 0.0, 0, 0.0, 0.0, 0.0
    for path, layer in layers.items():
        names = [n for n in active if n in layer.adapters]
        if not names:
            continue
        u = update_of(layer, names)
        w0 = dequantize(layer._base).float().to(u.device)
        wm = merged.get_submodule(path).weight.detach().float().to(u.device)
        wr = dequantize(requantized.get_submodule(path)).float().to(u.device)
        err = (wr - wm).abs()
        err_max = max(err_max, err.max().item())
        err_sum += err.sum().item()
        count += err.numel()
        dot_q += ((wr - w0) * u).sum().item()
        dot_m += ((wm - w0) * u).sum().item()
        norm += (u * u).sum().item()
    if count == 0:
        return {"layers": 0}
    return {"layers": sum(1 for p, la in layers.items() if any(n in la.adapters for n in active)),
            "max_abs_error": err_max, "mean_abs_error": err_sum / count,
            "update_kept": dot_q / norm if norm else float("nan"),
            "update_kept_16bit": dot_m / norm if norm else float("nan")}
