"""Fast-path fusion across modules: sibling linears in one call, LoRA inputs rebuilt instead of kept.

Two things the per-linear fused Function cannot see on its own, set up by `lk.inject`:

* **Siblings.** q/k/v (and gate/up) are separate modules that read the same tensor. A
  `SiblingGroup` holds the adapted linears of one parent with one input size. It learns,
  from a forward pass, which of them are called with the very same tensor object; from then
  on, in training (with autograd), the first of those computes all of their outputs in one `lora_linear_group` call (x read
  once, one concatenated A, one dropout mask on x shared by the group, input gradients summed
  in place) and the others pick theirs up. With `DECODE_GROUPS` on, eager inference with few rows
  (decode) does the same in one launch of `kernels.decode_group`. A call that does not fit the learned pattern
  (another tensor, x changed in place, grad mode or adapter state changed) computes alone, so
  the outputs are always those of the plain per-module forward (up to the shared mask).

* **Producers.** The LoRA Function keeps its input x for the gradient of A. When x is an
  RMSNorm output or the `act(gate) * up` product of a gated MLP, the ops that made x keep
  their own inputs for backward anyway, so x can be rebuilt from those (`mark_recomputable`)
  and need not stay alive: on the Llama 1.1B benchmark this is the difference between 1.22x
  and 1.01x the frozen model's peak memory (BENCHMARKS.md). `install_producers` gives
  recognized Hugging Face RMSNorm and gated-MLP modules a forward that computes the same
  result op for op and marks it. An RMSNorm's first call checks bit-equality with its own
  forward and falls back for good if they differ; an MLP qualifies only when its forward's
  source is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.

Everything here only applies on the fast path (`lk.set_fast_path`) and outside
`torch.compile` tracing; the reference path ignores it.
"""

from __future__ import annotations

import inspect
import re
import types
import weakref

import torch
from torch import Tensor, nn

# lorakit.kernels (which imports Triton) is imported where it is first needed, on the fast path.


class SiblingGroup:
    """Adapted linears under one parent with the same input size (candidates to share one call).

    What the group does may change only between passes of the whole model (`begin_pass`, a
    forward pre-hook on the model `lk.inject` adapted): a forward and its recomputation under
    gradient checkpointing must take the same path, or they would save different tensors.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.learned: tuple[int, ...] | None = None  # members called with one tensor, in call order
        self.enabled = True
        self._candidate: tuple[int, ...] | None = None  # learned in this pass, used from the next one
        self._seen: tuple[weakref.ref, int, list[int]] | None = None  # (x, x._version, member indices)
        self._pending: tuple[weakref.ref, int, bool, dict[int, Tensor]] | None = None
        self.hits = 0
        self.misses = 0
        self._plan = None  # a decode launch of the learned members (`_decode`)
        self._passes = 0
        self._refused = None  # (shape, dtype, pass): `_decode` did not serve such an input; tries again from pass

    def __repr__(self) -> str:
        return f"SiblingGroup({len(self.members)} members, learned={self.learned}, enabled={self.enabled})"

    def begin_pass(self) -> None:
        self._pending = None
        self._passes += 1
        if self.learned is None and self._candidate is not None:
            self.learned = self._candidate
        if self.misses > 16 and self.misses * 2 > self.hits:
            self.enabled = False  # this model calls its siblings in no stable pattern

    def forward(self, member: nn.Module, x: Tensor) -> Tensor | None:
        """member's output if the group has it or makes it now; None: compute it alone."""
        if not self.enabled:
            return None
        grad = torch.is_grad_enabled()
        if not grad and not (DECODE_GROUPS and _decodes(x)):
            return None  # inference with many rows: the per-linear path is one GEMM each; grouping saves nothing
        i = self.members.index(member)
        pending = self._pending
        if pending is not None:
            ref, version, was_grad, outs = pending
            if ref() is x and x._version == version and was_grad == grad and i in outs:
                y = outs.pop(i)
                if not outs:
                    self._pending = None
                self.hits += 1
                return y
            self._pending = None  # the pattern broke: drop the unused outputs
            self.misses += 1
        if self.learned is None:
            self._observe(i, x)
            return None
        if self.learned[0] != i:
            return None
        ys = self._run(x) if grad else self._decode(x)
        if ys is None:
            return None
        outs = dict(zip(self.learned, ys))
        y = outs.pop(i)
        self._pending = (weakref.ref(x), x._version, grad, outs)
        return y

    def _observe(self, i: int, x: Tensor) -> None:
        seen = self._seen
        if seen is not None and seen[0]() is x and seen[1] == x._version and i not in seen[2]:
            seen[2].append(i)
            if self._candidate is None and len(seen[2]) > 1:
                self._candidate = tuple(seen[2])
            elif self._candidate is not None and len(seen[2]) > len(self._candidate):
                self._candidate = tuple(seen[2])
            return
        self._seen = (weakref.ref(x), x._version, [i])

    def _run(self, x: Tensor) -> tuple[Tensor, ...] | None:
        """All learned members' outputs in one fused call, or None when their states differ."""
        layers = [self.members[j] for j in self.learned]
        adapters = []
        for layer in layers:
            if layer.disabled or layer.routing is not None:
                return None
            active = layer._unmerged_active()
            if len(active) != 1:
                return None
            adapters.append(active[0])
        p, training = adapters[0].dropout_p, layers[0].training
        if any(a.dropout_p != p for a in adapters) or any(layer.training != training for layer in layers):
            return None
        weights = [layer.weight.t() if layer.fan_in_fan_out else layer.weight for layer in layers]
        from .kernels import lora_linear_group, recipe_of

        return lora_linear_group(x, weights, [layer.bias for layer in layers], [a.lora_A for a in adapters],
                                 [a.full_B() for a in adapters], [a.scale for a in adapters], p, training,
                                 recompute=recipe_of(x))

    def _decode(self, x: Tensor) -> list[Tensor] | None:
        """Inference with few rows (decode): all learned members' outputs in one launch
        (`kernels.decode_group`), repeated from the second call on by a plan; None where it does not serve."""
        refused = self._refused
        if refused is not None and refused[0] == x.shape and refused[1] == x.dtype and self._passes < refused[2]:
            return None
        weights, biases, As, Bs, scales = [], [], [], [], []
        for j in self.learned:
            layer = self.members[j]
            if layer.disabled or layer.routing is not None or layer.merged or len(layer.active) != 1 \
                    or layer.fan_in_fan_out:
                return None
            a = layer._modules["adapters"]._modules.get(layer.active[0])
            if a is None:
                return None
            A, B, scale, p = a.operands()
            if p > 0 and layer.training:
                return None
            params = layer._parameters
            weights.append(params["weight"] if "weight" in params else layer.weight)
            biases.append(params["bias"] if "bias" in params else layer.bias)
            As.append(A)
            Bs.append(B)
            scales.append(float(scale))
        plan = self._plan
        ys = plan(x, weights, biases, As, Bs, scales) if plan is not None else None
        if ys is None:
            from .kernels import decode_group, decode_group_plan

            ys = decode_group(x, weights, biases, As, Bs, scales)
            if ys is None:  # not served (adapters in another dtype, say): inputs like x try again some passes later
                self._refused = (x.shape, x.dtype, self._passes + 64)
            else:
                self._plan = decode_group_plan(x, weights, biases, As, Bs, scales)
        return ys


#: Eager inference with few rows (decode): the learned siblings' outputs in one launch (q/k/v, gate/up), on
#: CUDA or under the Triton interpreter. Off by default: correct on the GPU, but no faster than the per-linear
#: plans in eager decoding on an H100 host (BENCHMARKS.md, inference run 15).
DECODE_GROUPS = False


def _decodes(x: Tensor) -> bool:
    """Whether x is a decode call the group kernel can take: few rows, on CUDA (eager, not under capture) or
    on CPU under the Triton interpreter."""
    from .kernels import _triton

    return x.numel() <= _triton.SMALL_MAX_ROWS * x.shape[-1] and _triton.available_for(x) \
        and not torch.compiler.is_compiling() and not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def group_siblings(model: nn.Module) -> None:
    """Give every adapted linear of `model` a `SiblingGroup` shared with its siblings (same parent,
    same input size), and let the groups change what they do only when `model` starts a forward."""
    from .layers import LoraLinear

    ungroup(model)
    groups = []
    for parent in model.modules():
        by_in: dict[int, list[nn.Module]] = {}
        for child in parent.children():
            if isinstance(child, LoraLinear):
                by_in.setdefault(child.in_features, []).append(child)
        for members in by_in.values():
            group = SiblingGroup(members) if len(members) > 1 else None
            if group is not None:
                groups.append(group)
            for m in members:
                m.siblings = group
    if groups:
        def begin_pass(module, args):
            for g in groups:
                g.begin_pass()

        model.__dict__["_lorakit_pass_hook"] = model.register_forward_pre_hook(begin_pass)


def ungroup(model: nn.Module) -> None:
    """Undo `group_siblings`."""
    handle = model.__dict__.pop("_lorakit_pass_hook", None)
    if handle is not None:
        handle.remove()
    for m in model.modules():
        if "siblings" in m.__dict__:
            del m.siblings


# -- producers ------------------------------------------------------------------------------------
def _marking() -> bool:
    # A recipe only helps an autograd graph; under torch.compile tracing the compiler plans memory itself.
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _rmsnorm_forward(self, hidden_states: Tensor) -> Tensor:
    # The Hugging Face Llama-family RMSNorm, op for op; pow keeps h32 and the multiply keeps
    # rstd for their own backward, so the output is marked as rebuildable from them.
    input_dtype = hidden_states.dtype
    h32 = hidden_states.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + self.variance_epsilon)
    out = self.weight * (h32 * rstd).to(input_dtype)
    if hidden_states.requires_grad and _marking() and out.dtype == self.weight.dtype == input_dtype:
        from .kernels import mark_recomputable, rms_norm_apply

        mark_recomputable(out, rms_norm_apply, h32, rstd, self.weight)
    return out


def _checked_rmsnorm_forward(self, hidden_states: Tensor) -> Tensor:
    """First call: compare with the module's own forward; keep ours only if bit-identical."""
    if torch.compiler.is_compiling() or hidden_states.device.type == "meta":
        return type(self).forward(self, hidden_states)
    with torch.no_grad():
        same = torch.equal(type(self).forward(self, hidden_states), _rmsnorm_forward(self, hidden_states))
    self.forward = types.MethodType(_rmsnorm_forward if same else type(self).forward, self)
    return self.forward(hidden_states)


def _mlp_forward(self, x: Tensor) -> Tensor:
    # down_proj(act_fn(gate_proj(x)) * up_proj(x)); the multiply keeps both factors for its own
    # backward, so the product is marked as rebuildable from them.
    s = self.act_fn(self.gate_proj(x))
    u = self.up_proj(x)
    h = s * u
    if h.requires_grad and _marking():
        from .kernels import mark_recomputable

        mark_recomputable(h, torch.mul, s, u)
    return self.down_proj(h)


_GATED_MLP = re.compile(r"returnself\.down_proj\(self\.act_fn\(self\.gate_proj\(x\)\)\*self\.up_proj\(x\)\)$"
                        r"|down_proj=self\.down_proj\(self\.act_fn\(self\.gate_proj\(x\)\)\*self\.up_proj\(x\)\)"
                        r"returndown_proj$")


def _is_rmsnorm(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
            and m.weight.dim() == 1 and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_gated_mlp(m: nn.Module) -> bool:
    if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        src = inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return False
    body = re.sub(r"\s+", "", src.split(":", 1)[1] if ":" in src else "")
    body = re.sub(r'"""[^"]*"""', "", body)
    return bool(_GATED_MLP.search(body))


def install_producers(model: nn.Module) -> int:
    """Mark RMSNorm and gated-MLP outputs as rebuildable (see the module docstring); returns how many."""
    n = 0
    for m in model.modules():
        if "forward" in m.__dict__:
            continue  # already installed, or someone else's instance forward: leave it
        if _is_rmsnorm(m):
            m.forward = types.MethodType(_checked_rmsnorm_forward, m)
        elif _is_gated_mlp(m):
            m.forward = types.MethodType(_mlp_forward, m)
        else:
            continue
        n += 1
    return n


def remove_producers(model: nn.Module) -> None:
    """Undo `install_producers`: the modules' class forward again."""
    ours = (_rmsnorm_forward, _checked_rmsnorm_forward, _mlp_forward)
    for m in model.modules():
        f = m.__dict__.get("forward")
        if isinstance(f, types.MethodType) and f.__func__ in ours:
            del m.forward
