"""LoRA on parameters (PEFT's `target_parameters`): the 3-D expert weights of mixture-of-experts models.

transformers stores the experts of a layer as 3-D parameters of one module, e.g. Qwen3-MoE's
`mlp.experts.gate_up_proj` (E, 2*I, H) and `down_proj` (E, H, I), applied as F.linear(x_e, W[e]) to the
tokens x_e routed to expert e; gpt-oss stores them transposed, (E, in, out), applied as x_e @ W[e]. An
adapted parameter gets one rank-r update per expert, laid out as PEFT lays it out:

    lora_A (E*r, in):  rows e*r .. e*r+r-1 are expert e's A_e (r, in)
    lora_B (out, r*E): column k*E + e is column k of expert e's B_e (out, r)
    dW[e] = scale * B_e @ A_e (out, in), stored (E, out, in), or (E, in, out) where the experts module
            says `is_transposed` (transformers' `use_experts_implementation`)

A 2-D parameter (out, in) is the one-expert case.

`LoraExperts` takes the place of a module that owns adapted parameters (as `LoraLinear` takes a linear's),
keeps that module's parameters and buffers under their own names (base checkpoints load unchanged) and
holds one `LoraParam` per adapted parameter in `lora_params`: a `LoraLayer` whose weight is that
parameter, so adapters, merge records (exact unmerge), routing and disabling work as for any wrapper.
Two paths compute its forward:

    reference  the module's own forward, given W + dW for the call (what PEFT's parametrization does)
    grouped    experts modules made by transformers' `use_experts_implementation` (Qwen3-MoE, gpt-oss,
               Mixtral, OLMoE, ...): tokens sorted by expert and every projection applied per expert
               group, x_e @ W_e^T + scale * (x_e @ A_e^T) @ B_e^T, with no dense dW; on the fast path
               (`lk.set_fast_path`), outside `route`

`lk.explain(experts_module, hidden_states)` says which one a call takes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LoraConfig
from .errors import StateError, TargetError
from .layers import LoraAdapter, LoraLayer, WeightEdit

CONTAINER = "lora_params"  # the ModuleDict of a LoraExperts that holds its LoraParam layers


# -- the reference math ---------------------------------------------------------------------------------
def expert_factors(A: Tensor, B: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's stacked factors as per-expert ones: A (E*r, in) -> (E, r, in); B (out, r*E) -> (E, out, r)."""
    return A.reshape(num_experts, -1, A.shape[-1]), B.reshape(B.shape[0], -1, num_experts).permute(2, 0, 1)


def expert_delta(A: Tensor, B: Tensor, scale: float, num_experts: int) -> Tensor:
    """dW[e] = scale * B_e @ A_e for every expert, (E, out, in), in float32 and detached (for merging)."""
    a, b = expert_factors(A.detach().float(), B.detach().float(), num_experts)
    return torch.bmm(b, a).mul_(scale)


# -- one adapted parameter ------------------------------------------------------------------------------
class LoraParam(LoraLayer):
    """The adapters of one parameter of a `LoraExperts`: its weight is the owner's parameter `param_name`.

    A is (E*r, in) and B (out, r*E) in PEFT's layout (see the module docstring); `in_features` and
    `out_features` are those of one expert. It is not called itself: its owner asks it for the weight
    the call sees (`effective_weight`).
    """

    kind = "param"

    def __init__(self, owner: LoraExperts, param_name: str, transposed: bool) -> None:
        nn.Module.__init__(self)  # LoraLayer.__init__ takes a module's weight; here the owner keeps it
        object.__setattr__(self, "_owner", owner)
        self.param_name = param_name
        shape = tuple(self.weight.shape)
        if len(shape) == 3:
            self.num_experts = shape[0]
            self.in_features, self.out_features = (shape[1], shape[2]) if transposed else (shape[2], shape[1])
            self.transposed = transposed
        else:
            self.num_experts, (self.out_features, self.in_features), self.transposed = 1, shape, False
        self.bias = None
        self._init_adapter_state()

    @property
    def weight(self) -> Tensor:
        return self._owner._parameters[self.param_name]

    def unwrap(self) -> nn.Module:
        raise StateError(f"{self.param_name} is a parameter of a LoraExperts module; eject the model instead.")

    def forward(self, x: Tensor) -> Tensor:
        raise StateError(f"The adapters of parameter {self.param_name!r} act through the module that owns it; "
                         "call that module.")

    # -- dW in the weight's layout -----------------------------------------------------------------------
    def _to_weight_layout(self, delta: Tensor) -> Tensor:
        """(E, out, in) -> the parameter's own layout: (E, in, out) when transposed, (out, in) when 2-D."""
        if self.weight.dim() == 2:
            return delta[0]
        return delta.transpose(1, 2) if self.transposed else delta

    def delta_weight(self, name: str) -> Tensor:
        a = self.adapter(name)
        return self._to_weight_layout(expert_delta(a.lora_A, a.lora_B, a.scale, self.num_experts))

    def _edit_delta(self, e: WeightEdit) -> Tensor:
        return self._to_weight_layout(expert_delta(e.A, e.B, e.scale, self.num_experts)).to(self.weight.device)

    def effective_weight(self, adapters: list[LoraAdapter] | None = None) -> Tensor:
        """W + dW of `adapters` (default: the unmerged active ones) in W's dtype, differentiable in A and B."""
        w = self.weight
        if self.disabled:
            return w
        for a in self._unmerged_active() if adapters is None else adapters:
            A, B = expert_factors(a.lora_A, a.lora_B, self.num_experts)
            delta = torch.bmm(B, A) * a.scale  # (E, out, in)
            w = w + self._to_weight_layout(delta).to(w.dtype)
        return w

    def extra_repr(self) -> str:
        return (f"{self.param_name}: experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, transposed={self.transposed}, active={self.active}")


def new_param_adapter(layer: LoraParam, r: int, alpha: float, rslora: bool, init: str, where: str) -> LoraAdapter:
    """Adapter factors for `layer`: A (E*r, in) kaiming-uniform (or N(0, 1/r^2) for "gaussian", zeros for
    "zeros"), B (out, r*E) zero, as PEFT initializes a parameter adapter.

    Raises:
        StateError: init="pissa", which has no per-expert form here.
    """
    if init == "pissa":
        raise StateError(f"init='pissa' is not supported on parameters ({where}); use init='kaiming' or 'gaussian'.")
    w, E = layer.weight, layer.num_experts
    A = torch.empty(E * r, layer.in_features, device=w.device, dtype=w.dtype)
    B = torch.zeros(layer.out_features, r * E, device=w.device, dtype=w.dtype)
    adapter = LoraAdapter(A, B, alpha, r, rslora, 0.0)
    with torch.no_grad():
        if init == "zeros":
            adapter.lora_A.zero_()
        elif init == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    return adapter


# -- the module that owns adapted parameters -----------------------------------------------------------
class LoraExperts(nn.Module):
    """Takes the place of a module whose parameters are adapted (usually a mixture-of-experts `experts`).

    It holds the module's parameters and buffers under their own names and shares its submodules, so the
    model's state_dict keys do not change; `lora_params` maps a parameter name to its `LoraParam`.
    Attributes it does not have are read from the wrapped module (`num_experts`, `is_transposed`, ...).

    The forward passes the call to the wrapped module, which sees W + dW for each adapted parameter
    while it runs (the reference path), or computes it grouped by expert (see the module docstring).
    Under `lk.route`, the module's first argument must hold the tokens of the batch example after example
    (hidden states of shape (batch * seq, hidden), as transformers' MoE blocks pass them); each example's
    tokens go through its own adapter.

    On the reference path the wrapped module is handed the weights for the duration of its call (as
    instance attributes), so one module serves one forward at a time: threads that run the same model at
    once need a model each (as with `lk.route`).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        # Parameters and buffers move here (as LoraLayer takes a linear's weight) and are handed to the
        # wrapped module for each call; submodules are shared, so the module's forward finds its own.
        self._moved = [n for n, p in base._parameters.items() if p is not None]
        self._moved_buffers = [n for n, b in base._buffers.items() if b is not None]
        for n in self._moved:
            self.register_parameter(n, base._parameters.pop(n))
        for n in self._moved_buffers:
            self.register_buffer(n, base._buffers.pop(n), persistent=n not in base._non_persistent_buffers_set)
        for n, child in base._modules.items():
            self.add_module(n, child)
        object.__setattr__(self, "_base", base)
        self.add_module(CONTAINER, nn.ModuleDict())
        self.train(base.training)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_base")
            if base is None:
                raise
            return getattr(base, name)

    def layers(self) -> list[LoraParam]:
        return list(self._modules[CONTAINER]._modules.values())

    def unwrap(self) -> nn.Module:
        """Give the wrapped module its parameters and buffers back and return it (the adapters are dropped)."""
        base = self._base
        for n in self._moved:
            base.register_parameter(n, self._parameters[n])
        for n in self._moved_buffers:
            base.register_buffer(n, self._buffers[n], persistent=n not in self._non_persistent_buffers_set)
        base.train(self.training)
        return base

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        layers = self.layers()
        routing = layers[0].routing if layers else None
        if routing is not None and not layers[0].disabled:
            return self._routed_forward(layers, routing, args, kwargs)
        if path_for(self, args, kwargs) == "grouped":
            return grouped_experts_forward(self, *args)
        return self._call_base({p.param_name: p.effective_weight() for p in layers}, args, kwargs)

    def _call_base(self, weights: dict[str, Tensor], args, kwargs):
        """The wrapped module's forward, seeing `weights` (name -> tensor) in place of those parameters."""
        base = self._base
        seen = {**self._parameters, **self._buffers, **weights}
        # Instance attributes come before nn.Module's parameter lookup, so the module's forward reads these;
        # they are taken away again when it returns.
        base.__dict__.update(seen)
        base.training = self.training
        try:
            return base(*args, **kwargs)
        finally:
            for n in seen:
                base.__dict__.pop(n, None)

    def _routed_forward(self, layers: list[LoraParam], routing: list[str | None], args, kwargs):
        """Each example's tokens through the module with its own adapter's W + dW (None: the weights alone)."""
        hidden = args[0] if args else next(iter(kwargs.values()))
        n_tokens, n_rows = hidden.shape[0], len(routing)
        if n_tokens % n_rows:
            raise StateError(
                f"route() was given {n_rows} adapter names but this experts module got {n_tokens} tokens "
                f"(input shape {tuple(hidden.shape)}), which is not a whole number of tokens per example; "
                "pass one name (or None) per example.")
        per_row = n_tokens // n_rows
        out = None
        for name in dict.fromkeys(routing):
            rows = torch.tensor([i for i, n in enumerate(routing) if n == name], device=hidden.device)
            idx = (rows[:, None] * per_row + torch.arange(per_row, device=hidden.device)).reshape(-1)

            def pick(t):
                is_rows = isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n_tokens
                return t.index_select(0, idx) if is_rows else t

            weights = {p.param_name: p.effective_weight([p.adapters[name]] if name in p.adapters else [])
                       for p in layers}
            y = self._call_base(weights, [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()})
            if not isinstance(y, Tensor):
                raise StateError(f"{type(self._base).__name__} returns {type(y).__name__}, not a tensor: lk.route "
                                 "cannot split its output by example.")
            out = y.new_zeros((n_tokens, *y.shape[1:])) if out is None else out
            out = out.index_copy(0, idx, y)
        return out

    def explain(self, hidden_states: Tensor, *args, **kwargs) -> str:
        """Which path a call with these arguments takes, and why (nothing is computed). Given the hidden
        states alone, the call is taken to be transformers' (hidden_states, top_k_index, top_k_weights)."""
        if not args and not kwargs:
            args = (hidden_states, hidden_states, hidden_states)  # only their being tensors is looked at
        else:
            args = (hidden_states, *args)
        path = path_for(self, args, kwargs)
        if path == "grouped":
            return ("grouped: tokens sorted by expert; base weights and LoRA factors applied per expert group "
                    "(no dense dW)")
        return f"reference: {type(self._base).__name__}'s own forward on W + dW ({path})"

    def extra_repr(self) -> str:
        return f"{type(self._base).__name__}, adapted={list(self._modules[CONTAINER])}"


# -- the grouped path -----------------------------------------------------------------------------------
def path_for(module: LoraExperts, args, kwargs) -> str:
    """"grouped", or the reason a call takes the reference path."""
    from . import fast

    base = module._base
    layers = module.layers()
    if len(args) != 3 or kwargs or not all(isinstance(a, Tensor) for a in args):
        return "called with other arguments than (hidden_states, top_k_index, top_k_weights)"
    if not fast.enabled_for(args[0]):
        return f"fast path mode {fast.fast_path_mode()!r} on {args[0].device}"
    if not all(hasattr(base, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")):
        return f"{type(base).__name__} is not a transformers experts module (use_experts_implementation)"
    if getattr(base, "has_post_expert_norm", False) or getattr(base, "_is_expert_parallel", False):
        return "post-expert norm or expert parallelism"
    projections = {"gate_up_proj" if base.has_gate else "up_proj", "down_proj"}
    if any(p.param_name not in projections for p in layers):
        return "an adapted parameter that is not an expert projection"
    if any(p.disabled or p.routing is not None for p in layers):
        return "disabled or routed"
    return "grouped"


def grouped_experts_forward(module: LoraExperts, hidden_states: Tensor, top_k_index: Tensor,
                            top_k_weights: Tensor) -> Tensor:
    """transformers' experts forward (`use_experts_implementation`) with each expert's LoRA terms added to
    its tokens: hidden_states (T, H), top_k_index and top_k_weights (T, k) -> (T, H)."""
    base = module._base
    num_experts, k = base.num_experts, top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,) with S = T * k token-expert pairs
    order = torch.argsort(expert_ids, stable=True)
    token = order // k
    # tokens per expert with histc, whose output size is known without reading the ids back to the host
    # (bincount's is not): no device sync, so a CUDA graph can hold the step; CPU histc takes floats only
    ids = expert_ids.int() if expert_ids.is_cuda else expert_ids.float()
    counts = torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)
    x = hidden_states[token]  # (S, H), grouped by expert
    sorted_ids = expert_ids[order]
    up = "gate_up_proj" if base.has_gate else "up_proj"
    h = _grouped_projection(module, up, x, counts, sorted_ids)
    h = base._apply_gate(h) if base.has_gate else base.act_fn(h)
    out = _grouped_projection(module, "down_proj", h, counts, sorted_ids)
    out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    # back to (token, k) order and summed over k, as transformers does (deterministic, unlike index_add on CUDA)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return out[inverse].view(-1, k, out.shape[-1]).sum(1).to(hidden_states.dtype)


def _grouped_projection(module: LoraExperts, name: str, x: Tensor, counts: Tensor, sorted_ids: Tensor) -> Tensor:
    """x_e @ W_e^T (+ bias_e) + sum over unmerged active adapters of scale * (x_e @ A_e^T) @ B_e^T, per group e."""
    w = module._parameters[name]
    base = module._base
    w_in_out = w if base.is_transposed else w.transpose(1, 2)  # (E, in, out)
    y = grouped_mm(x, w_in_out, counts)
    if base.has_bias:
        y = y + module._parameters[f"{name}_bias"][sorted_ids]
    layer = module._modules[CONTAINER]._modules.get(name)
    if layer is not None:
        for a in layer._unmerged_active():
            A, B = expert_factors(a.lora_A, a.lora_B, layer.num_experts)  # (E, r, in), (E, out, r)
            low = grouped_mm(x.to(A.dtype), A.transpose(1, 2), counts)  # (S, r)
            y = y + (grouped_mm(low, B.transpose(1, 2), counts) * a.scale).to(y.dtype)
    return y


def grouped_mm(x: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """Rows of x grouped by expert (counts[e] rows for expert e, in order) times w[e]: x (S, in), w (E, in, out).

    torch's grouped matmul kernel on CUDA where its layout rules hold (16-bit dtypes, 16-byte strides),
    else one matmul per expert.
    """
    size = x.element_size()
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and hasattr(F, "grouped_mm") \
            and (w.shape[1] * size) % 16 == 0 and (w.shape[2] * size) % 16 == 0:
        if w.stride(2) != 1 and w.stride(1) != 1:  # the kernel reads row- or column-major matrices only
            w = w.contiguous()
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        return F.grouped_mm(x.contiguous(), w, offs=offs)
    parts = x.split([int(c) for c in counts.tolist()])
    return torch.cat([p @ w[e] for e, p in enumerate(parts)])


# -- finding and wrapping parameters --------------------------------------------------------------------
def parameter_path(layer_path: str) -> str:
    """The model's name of the parameter a LoraParam at `layer_path` adapts: ...experts.lora_params.X -> ...experts.X"""
    owner, _, pname = ("." + layer_path).rpartition(f".{CONTAINER}.")
    return f"{owner[1:]}.{pname}" if owner else pname


def _param_matches(names: list[str], key: str) -> bool:
    return any(key == t or key.endswith("." + t) for t in names)


def match_parameters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the parameters `cfg.target_parameters` selects (PEFT's rule: equal, or ends with
    "." + name), in model order.

    Raises:
        TargetError: nothing matched (the message lists 2-D/3-D parameter names that exist), a match is not
            a 2-D or 3-D floating-point weight, or is the weight of a module adapted through `targets`.
    """
    found, candidates = [], []
    for mpath, module in _owners(model):
        for pname, p in module._parameters.items():
            if p is None:
                continue
            key = f"{mpath}.{pname}" if mpath else pname
            if p.dim() in (2, 3) and p.is_floating_point():
                candidates.append(key)
            if not _param_matches(cfg.target_parameters, key):
                continue
            if isinstance(module, LoraLayer):
                raise TargetError(f"target_parameters matched {key!r}, the weight of a module adapted through "
                                  "`targets`; adapt it one way only (drop it from targets or target_parameters).")
            if p.dim() not in (2, 3) or not p.is_floating_point():
                raise TargetError(
                    f"target_parameters matched {key!r}, a {p.dim()}-D {p.dtype} parameter of shape {tuple(p.shape)}; "
                    "LoRA on parameters needs a 2-D (out, in) or 3-D (experts, ., .) floating-point weight. "
                    "Name a weight instead (e.g. 'mlp.experts.gate_up_proj').")
            found.append(key)
    if not found:
        three = sorted({".".join(k.split(".")[-2:]) for k in candidates if model.get_parameter(k).dim() == 3})
        two = sorted({".".join(k.split(".")[-2:]) for k in candidates} - set(three))
        listed = (three + two)[:20]
        raise TargetError(
            f"target_parameters={cfg.target_parameters!r} matched no parameter of {type(model).__name__}. "
            f"Parameters it could adapt include: {', '.join(listed) or 'none'}"
            f"{' ...' if len(three) + len(two) > 20 else ''} (3-D expert weights first). Pass some of those.")
    return found


def _owners(model: nn.Module):
    """(path, module) of every module that directly owns parameters lorakit may adapt (not a LoraParam)."""
    for mpath, module in model.named_modules():
        if isinstance(module, LoraParam) or f".{CONTAINER}." in f".{mpath}.":
            continue
        yield mpath, module


def param_layer(model: nn.Module, key: str) -> tuple[LoraParam, nn.Module | None, bool]:
    """The LoraParam for parameter `key`, wrapping its owner in a LoraExperts and creating the layer if needed.

    Returns (layer, the module that was wrapped here or None, whether the layer was created here)."""
    mpath, _, pname = key.rpartition(".")
    owner = model.get_submodule(mpath) if mpath else model
    wrapped = None
    if not isinstance(owner, LoraExperts):
        if owner is model:
            raise TargetError(f"target_parameters matched {key!r}, a parameter of the model itself; only parameters "
                              "of its submodules can be adapted.")
        wrapped, owner = owner, LoraExperts(owner)
        _set_submodule(model, mpath, owner)
    container = owner._modules[CONTAINER]
    created = pname not in container
    if created:
        container[pname] = LoraParam(owner, pname, bool(getattr(owner._base, "is_transposed", False)))
    return container[pname], wrapped, created


def release(model: nn.Module, key: str, wrapped: nn.Module | None, created: bool) -> None:
    """Undo `param_layer`: drop a layer it created and give back a module it wrapped."""
    mpath, _, pname = key.rpartition(".")
    owner = model.get_submodule(mpath)
    if created and isinstance(owner, LoraExperts):
        del owner._modules[CONTAINER][pname]
    if wrapped is not None and isinstance(owner, LoraExperts):
        _set_submodule(model, mpath, owner.unwrap())


def unwrap_all(model: nn.Module) -> None:
    """Put every module a LoraExperts wraps back in its place (eject's last step)."""
    for mpath, module in list(model.named_modules()):
        if isinstance(module, LoraExperts):
            _set_submodule(model, mpath, module.unwrap())


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def peft_key_paths(model: nn.Module, name: str) -> dict[str, str]:
    """{LoraParam path: the module path PEFT writes its tensors under} for adapter `name`.

    PEFT wraps the owner once per adapted parameter, the first parameter (in the module's order) innermost:
    with k adapted parameters, parameter i is saved under `<owner>` + ".base_layer" * (k - 1 - i).
    """
    out = {}
    for mpath, module in model.named_modules():
        if not isinstance(module, LoraExperts):
            continue
        container = module._modules[CONTAINER]
        adapted = [p for p in module._moved if p in container and name in container[p].adapters]
        for i, pname in enumerate(adapted):
            out[f"{mpath}.{CONTAINER}.{pname}"] = mpath + ".base_layer" * (len(adapted) - 1 - i)
    return out


def resolve_peft_path(model: nn.Module, path: str, target_parameters: list[str]) -> str | None:
    """The full parameter name that PEFT's module path `path` (`<owner>` + ".base_layer" * d) stands for,
    given the adapter's target_parameters; None when `path` is not a parameter adapter's."""
    depth = 0
    while path.endswith(".base_layer"):
        path, depth = path[: -len(".base_layer")], depth + 1
    try:
        owner = model.get_submodule(path)
    except AttributeError:
        return None
    if isinstance(owner, LoraLayer):
        return None
    params = (owner._moved if isinstance(owner, LoraExperts)
              else [n for n, p in owner._parameters.items() if p is not None])
    adapted = [p for p in params if _param_matches(target_parameters, f"{path}.{p}")]
    if depth >= len(adapted):
        return None
    return f"{path}.{adapted[len(adapted) - 1 - depth]}"


def parameter_shape(model: nn.Module, key: str) -> tuple[int, int, int, bool] | None:
    """(experts, in, out, transposed) of one expert of parameter `key` as PEFT reads it; None if absent."""
    mpath, _, pname = key.rpartition(".")
    try:
        owner = model.get_submodule(mpath)
    except AttributeError:
        return None
    p = owner._parameters.get(pname)
    if p is None:
        return None
    if p.dim() == 3:
        transposed = bool(getattr(owner, "is_transposed", False))
        return (p.shape[0], p.shape[1], p.shape[2], True) if transposed else (p.shape[0], p.shape[2], p.shape[1], False)
    if p.dim() == 2:
        return 1, p.shape[1], p.shape[0], False
    return None


def layer_of(model: nn.Module, key: str) -> LoraParam:
    """The LoraParam of parameter `key` (after inject)."""
    mpath, _, pname = key.rpartition(".")
    return model.get_submodule(mpath)._modules[CONTAINER][pname]
