"""What a trained adapter learned: the analysis of Section 7 of the LoRA paper (Hu et al., 2022).

Three questions, each a pure function over tensors, plus a driver that runs them over whole adapters:

- Subspace similarity (Section 7.2, Figures 3-4): do adapters of different ranks or seeds learn the
  same directions? `subspace_similarity` gives phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j) for all i, j.
- Amplification (Section 7.3, Table 7): how does dW relate to W? `amplification` projects W onto the
  top-r singular directions of dW and compares ||dW||_F with ||U^T W V||_F.
- Spectrum: the singular values of dW (`delta_svd`, from the thin factors), their entropy-based
  effective rank (`effective_rank`) and how many of them hold 90% / 99% of the energy (`energy_rank`).

Shapes follow nn.Linear: A is (r, in), B is (out, r), dW = s * B @ A is (out, in), s = alpha / r
(alpha / sqrt(r) with rsLoRA). The math runs in float64: the quantities compared here (overlaps of
near-orthogonal directions, ratios of small norms) lose their meaning in bfloat16 or float32.

Adapters are read from PEFT-format directories by the reader behind `load_adapter` (`read_adapter`),
so files written by lorakit, PEFT or anything else using that layout can be analysed without a model.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, read_adapter_dir



# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterTensors:
    """The low-rank factors of one adapted module, in the nn.Linear layout.

    Attributes:
        module: module path in the base model, e.g. "model.layers.0.self_attn.q_proj".
        A: (r, in) down-projection, dtype as stored. Conv layers are flattened to (r, in * kh * kw).
        B: (out, r) up-projection. Conv layers are flattened from (out, r, 1, 1).
        scale: s in dW = s * B @ A.
        r: the rank (rows of A).
        alpha: the alpha the scale was derived from.
        kind: "linear", "embedding" or "conv".
        weight_shape: the shape of the base module's `weight` as the module stores it: (out, in) for
            linear layers, (num_embeddings, dim) for embeddings, (out, in, kh, kw) for conv layers.

    Embeddings: PEFT stores lora_embedding_A as (r, num_embeddings) and lora_embedding_B as (dim, r),
    and the embedding's weight changes by (s * B @ A)^T. Read as a linear map from a one-hot token
    (in = num_embeddings) to a vector (out = dim), that is the same convention as a linear layer, so
    A, B and `delta()` follow it unchanged; only the base weight is transposed (see `base_matrix`).
    """

    module: str
    A: Tensor
    B: Tensor
    scale: float
    r: int
    alpha: float
    kind: str = "linear"
    weight_shape: tuple[int, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of dW."""
        return (self.B.shape[0], self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """dW = scale * B @ A, shape (out, in), in `dtype` (float64 by default)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))

    def base_matrix(self, weight: Tensor) -> Tensor:
        """The base module's weight as a float64 (out, in) matrix, the layout of `delta()`.

        Accepts the module's `weight` as it is stored: (out, in) for nn.Linear, (in, out) for GPT-2's
        Conv1D (recognised by shape when the matrix is not square), (num_embeddings, dim) for
        nn.Embedding, (out, in, kh, kw) for conv layers.

        Raises:
            ShapeMismatchError: the weight fits neither layout.
        """
        out, inp = self.shape
        w = weight.detach().to("cpu", torch.float64)
        if self.kind == "conv" and w.dim() > 2:
            w = w.reshape(w.shape[0], -1)
        if w.dim() == 2:
            # An embedding stores (num_embeddings, dim) = (in, out): try that layout first so that
            # square embeddings are transposed too.
            if self.kind == "embedding" and tuple(w.shape) == (inp, out):
                return w.T
            if tuple(w.shape) == (out, inp):
                return w
            if tuple(w.shape) == (inp, out):
                return w.T
        raise ShapeMismatchError(
            f"{self.module}: base weight has shape {tuple(weight.shape)}, but the adapter's dW is "
            f"(out={out}, in={inp}) ({self.kind}); pass the weight of the module the adapter was "
            f"trained on, from the same base model"
        )


def read_adapter(path: str | os.PathLike[str]) -> dict[str, AdapterTensors]:
    """Read a PEFT-format adapter directory without building a model.

    The files are read by `lorakit.io.read_adapter_dir`, the reader behind `load_adapter`, and each
    module's scale comes from `LoraConfig.scale_for` (r, lora_alpha, use_rslora, rank_pattern and
    alpha_pattern of `adapter_config.json`, patterns matched against the module path as PEFT does).
    Tensors that are not LoRA factors (biases, modules_to_save copies) are skipped with a warning.

    Args:
        path: the adapter directory (or the adapter_model.safetensors file inside it).

    Returns:
        module path -> AdapterTensors, sorted by module path in natural order (layer 2 before 10).

    Raises:
        AdapterFileError: a file is missing, corrupt or not a LoRA adapter (DoRA included), the
            tensors disagree with the config (a rank that differs from r / rank_pattern, A without B),
            or the file holds several adapters.
    """
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_NAME:
        path = path.parent
    if not path.is_dir():
        raise AdapterFileError(f"{path}: no such adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    config, pairs, extra, weights = read_adapter_dir(path)
    if extra:
        shown = ", ".join(list(extra)[:3]) + (", ..." if len(extra) > 3 else "")
        warnings.warn(f"{weights}: skipped {len(extra)} tensors that are not LoRA factors ({shown})", stacklevel=2)
    if not pairs:
        raise AdapterFileError(f"{weights}: no LoRA factors (keys ending in lora_A.weight / lora_B.weight) found")
    try:
        file_cfg = LoraConfig(r=int(config["r"]), alpha=float(config["lora_alpha"]),
                              rslora=bool(config.get("use_rslora", False)),
                              rank_pattern={k: int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                              alpha_pattern={k: float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                              targets=["_"])
    except (ConfigError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {e}") from e

    out: dict[str, AdapterTensors] = {}
    for module in sorted(pairs, key=_natural_key):
        A, B = pairs[module]["A"], pairs[module]["B"]
        kind = "embedding" if pairs[module]["embedding"] else ("conv" if A.dim() == 4 else "linear")
        weight_shape: tuple[int, ...]
        if kind == "conv":
            # A (r, in, kh, kw), B (out, r, 1, 1): dW = B @ A on the flattened kernel (groups == 1).
            weight_shape = (B.shape[0], *A.shape[1:])
            A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)
        elif kind == "embedding":
            weight_shape = (A.shape[1], B.shape[0])
        else:
            weight_shape = (B.shape[0], A.shape[1])
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFileError(
                f"{weights}: {module} has A {tuple(pairs[module]['A'].shape)} and B {tuple(pairs[module]['B'].shape)}, "
                f"which do not share a rank (expected A (r, in) and B (out, r))"
            )
        r = A.shape[0]
        if file_cfg.rank_for(module) != r:
            raise AdapterFileError(
                f"{weights}: {module} has rank {r}, but {CONFIG_NAME} says r={file_cfg.rank_for(module)}; "
                f"the config does not belong to these weights"
            )
        out[module] = AdapterTensors(module, A, B, file_cfg.scale_for(module), r, file_cfg.alpha_for(module), kind,
                                     tuple(int(d) for d in weight_shape))
    return out


# ----------------------------------------------------------------------------------------------
# Spectrum
# ----------------------------------------------------------------------------------------------


def delta_svd(B: Tensor, A: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of dW = scale * B @ A from the factors, without forming dW.

    B = Qb Rb and A^T = Qa Ra (reduced QR), so dW = Qb (scale * Rb Ra^T) Qa^T and only the core,
    at most r x r, needs an SVD: O((out + in) r^2) work and memory instead of O(out * in * r).

    Args:
        B: (out, r).
        A: (r, in).
        scale: s.

    Returns:
        U (out, k), S (k,), V (in, k), float64, k = min(out, in, r), S descending and >= 0,
        with dW = U @ diag(S) @ V^T.

    Raises:
        ShapeMismatchError: B and A do not share the rank dimension.
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(f"expected B (out, r) and A (r, in), got B {tuple(B.shape)} and A {tuple(A.shape)}")
    Qb, Rb = torch.linalg.qr(B.detach().to("cpu", torch.float64))  # (out, kb), (kb, r)
    Qa, Ra = torch.linalg.qr(A.detach().to("cpu", torch.float64).T)  # (in, ka), (ka, r)
    core = scale * (Rb @ Ra.T)  # (kb, ka)
    Uc, S, Vch = torch.linalg.svd(core, full_matrices=False)
    return Qb @ Uc, S, Qa @ Vch.T


def effective_rank(S: Tensor) -> float:
    """Entropy-based effective rank of a spectrum (Roy & Vetterli, 2007).

    exp(H(p)) with p_k = S_k / sum(S): k for k equal non-zero singular values, 1 for a single one,
    in between for a decaying spectrum. 0.0 for an all-zero spectrum.

    Args:
        S: (k,) singular values, >= 0.
    """
    S = S.detach().to("cpu", torch.float64)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(S: Tensor, fraction: float = 0.9) -> int:
    """The fewest leading singular values that hold `fraction` of the energy sum(S^2) = ||dW||_F^2.

    Args:
        S: (k,) singular values, descending, >= 0.
        fraction: in (0, 1].

    Returns:
        The count, 0 for an all-zero spectrum.

    Raises:
        ConfigError: fraction outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = S.detach().to("cpu", torch.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    cumulative = energy.cumsum(0) / total
    # A relative slack of 1e-12 so that, e.g., 9 of 10 equal values count as 90% despite rounding.
    return int((cumulative < fraction - 1e-12).sum()) + 1


def numerical_rank(S: Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float64) -> int:
    """Count of singular values above the rounding floor max(shape) * eps(dtype) * max(S) (as numpy)."""
    if S.numel() == 0:
        return 0
    tol = max(shape) * torch.finfo(dtype).eps * float(S.max())
    return int((S > tol).sum())


def spectrum_report(S: Tensor, r: int | None = None) -> dict[str, Any]:
    """JSON-ready summary of a spectrum: the values, Frobenius norm, effective and energy ranks.

    Args:
        S: (k,) singular values of dW, descending.
        r: the adapter's rank, recorded alongside when given.
    """
    S = S.detach().to("cpu", torch.float64)
    fro = float(S.square().sum().sqrt())
    return {
        "r": r,
        "singular_values": [float(x) for x in S],
        "fro_norm": fro,
        "effective_rank": effective_rank(S),
        "rank_90": energy_rank(S, 0.9),
        "rank_99": energy_rank(S, 0.99),
        "top1_energy": float(S[0] ** 2 / fro**2) if fro > 0 else None,
    }


# ----------------------------------------------------------------------------------------------
# Subspace similarity
# ----------------------------------------------------------------------------------------------


def _singular_vectors(M: Tensor, side: str) -> Tensor:
    # Columns are the singular vectors ordered by singular value, in the space of dimension d.
    M = M.detach().to("cpu", torch.float64)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return Vh.T if side == "right" else U


def subspace_similarity(M1: Tensor, M2: Tensor, side: str = "right") -> Tensor:
    """Normalized subspace similarity phi(M1, M2, i, j) of Section 7.2, for every i and j.

    phi(i, j) = ||U1_i^T U2_j||_F^2 / min(i, j), where U1_i holds the top-i singular vectors of M1
    and U2_j the top-j of M2. It is 1 when one subspace contains the other and 0 when they are
    orthogonal; two random subspaces of dimensions i and j in R^d give max(i, j) / d on average.

    Args:
        M1: side="right" (the A factors, rows = rank): (r1, d), compared through the right singular
            vectors, which live in the layer's input space. side="left" (the B factors, columns =
            rank): (d, r1), compared through the left singular vectors, in the output space.
        M2: (r2, d) or (d, r2) likewise.
        side: "right" or "left".

    Returns:
        float64 (k1, k2) with [i - 1, j - 1] = phi(i, j), k = min(r, d) (= r whenever r <= d).
        Directions of zero singular values are arbitrary, so rows / columns past a factor's numerical
        rank carry no meaning.

    Raises:
        ConfigError: side is neither "right" nor "left".
        ShapeMismatchError: the matrices are not 2-D or live in spaces of different dimension.
    """
    if side not in ("right", "left"):
        raise ConfigError(f'side must be "right" (A factors) or "left" (B factors), got {side!r}')
    axis = 1 if side == "right" else 0
    if M1.dim() != 2 or M2.dim() != 2 or M1.shape[axis] != M2.shape[axis]:
        raise ShapeMismatchError(
            f"subspace similarity ({side} singular vectors) needs two 2-D matrices sharing dimension {axis}; "
            f"got {tuple(M1.shape)} and {tuple(M2.shape)}"
        )
    U1 = _singular_vectors(M1, side)  # (d, k1)
    U2 = _singular_vectors(M2, side)  # (d, k2)
    overlap = (U1.T @ U2).square()  # (k1, k2): squared cosines between single directions
    # ||U1_i^T U2_j||_F^2 sums the overlaps of the top-i by top-j block: a 2-D prefix sum.
    block = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, block.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, block.shape[1] + 1, dtype=torch.float64)[None, :]
    # Clamp away rounding above 1; the exact value never exceeds it.
    return (block / torch.minimum(i, j)).clamp_(0.0, 1.0)


@dataclass
class SimilarityResult:
    """Per-module phi matrices of two adapters (see `compare_adapters`).

    Attributes:
        phi: module path -> float64 (r1, r2) phi matrix, for the modules both adapters adapt.
        only_in_a / only_in_b: modules that only one adapter adapts.
        skipped: module -> reason, for common modules that cannot be compared.
        factor: "A" or "B".
    """

    phi: dict[str, Tensor]
    only_in_a: list[str]
    only_in_b: list[str]
    skipped: dict[str, str]
    factor: str


def _compare_one(ta: AdapterTensors, tb: AdapterTensors, factor: str) -> Tensor | str:
    # Returns phi, or the reason the module cannot be compared.
    if ta.kind != tb.kind or ta.shape != tb.shape:
        return f"adapted differently: {ta.kind} {ta.shape} in a, {tb.kind} {tb.shape} in b"
    M1, M2 = (ta.A, tb.A) if factor == "A" else (ta.B, tb.B)
    for label, M in (("a", M1), ("b", M2)):
        if not bool(M.detach().abs().amax() > 0):
            return f"{factor} is all zeros in adapter {label} (untrained?): its singular directions are undefined"
    return subspace_similarity(M1, M2, side="right" if factor == "A" else "left")


def compare_adapters(
    a: Mapping[str, AdapterTensors],
    b: Mapping[str, AdapterTensors],
    factor: str = "A",
    progress: bool = False,
) -> SimilarityResult:
    """phi(i, j) between two adapters, module by module (the paper's Figures 3-4).

    The paper compares the A factors (right singular vectors, input space) of adapters trained with
    different ranks or seeds; factor="B" compares the B factors (left singular vectors, output space).

    Args:
        a, b: module path -> AdapterTensors, e.g. from `read_adapter`.
        factor: "A" or "B".
        progress: show a progress bar.

    Raises:
        ConfigError: factor is neither "A" nor "B".
    """
    if factor not in ("A", "B"):
        raise ConfigError(f'factor must be "A" or "B", got {factor!r}')
    common = [m for m in a if m in b]
    result = SimilarityResult(
        phi={},
        only_in_a=[m for m in a if m not in b],
        only_in_b=[m for m in b if m not in a],
        skipped={},
        factor=factor,
    )
    for module in _progress(common, progress, f"similarity of {factor}"):
        phi = _compare_one(a[module], b[module], factor)
        if isinstance(phi, str):
            result.skipped[module] = phi
        else:
            result.phi[module] = phi
    return result


# ----------------------------------------------------------------------------------------------
# Amplification
# ----------------------------------------------------------------------------------------------


def amplification(
    dW: Tensor | AdapterTensors,
    W: Tensor,
    r: int | None = None,
    *,
    n_random: int = 8,
    seed: int = 0,
    w_directions: bool = True,
) -> dict[str, Any]:
    """How strongly dW amplifies directions of W (Section 7.3, Table 7).

    With U (out, r), V (in, r) the top-r left / right singular vectors of dW, the projection of W
    onto dW's subspace is U^T W V (r, r). The paper's amplification factor is
    ||dW||_F / ||U^T W V||_F: large when dW boosts directions that W holds only weakly. For
    comparison the same projection is taken onto W's own top-r directions (= the norm of W's r
    largest singular values) and onto random r-dimensional subspaces (Haar-distributed, from the QR
    of Gaussian matrices), whose mean square has the closed form (r / out) (r / in) ||W||_F^2.

    Args:
        dW: (out, in) update, or an AdapterTensors whose s * B @ A is used without forming it.
        W: the base weight, (out, in). With an AdapterTensors the module's own layout is accepted too
            (see `AdapterTensors.base_matrix`).
        r: directions to use; default the numerical rank of dW (the adapter's rank when trained).
        n_random: random subspaces to average over (0 skips them).
        seed: seed of the random subspaces, for reproducible reports.
        w_directions: also project onto W's top-r directions (an SVD of W: costly for large W).

    Returns:
        {"r", "dW_fro", "W_fro", "proj_dW", "proj_W", "proj_random" (root mean square over the
        n_random draws), "proj_random_expected", "amplification" (dW_fro / proj_dW), "n_random",
        "seed"}; float64 values as Python floats, None where undefined (proj_W when skipped,
        amplification when proj_dW is 0).

    Raises:
        ShapeMismatchError: W does not have dW's shape.
        ConfigError: r outside 1..rank available, or n_random < 0.
    """
    if isinstance(dW, AdapterTensors):
        Wm = dW.base_matrix(W)
        U, S, V = delta_svd(dW.B, dW.A, dW.scale)
        floor_dtype = torch.float64  # the product of the stored factors has exact rank <= r
        shape = dW.shape
    else:
        if dW.dim() != 2 or tuple(W.shape) != tuple(dW.shape):
            raise ShapeMismatchError(
                f"amplification needs dW and W of one (out, in) shape, got dW {tuple(dW.shape)} and W {tuple(W.shape)}"
            )
        Wm = W.detach().to("cpu", torch.float64)
        U, S, Vh = torch.linalg.svd(dW.detach().to("cpu", torch.float64), full_matrices=False)
        V = Vh.T
        # A dense dW carries rounding noise at its own precision in every direction.
        floor_dtype = dW.dtype if dW.dtype.is_floating_point else torch.float64
        shape = (dW.shape[0], dW.shape[1])
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    if r is None:
        r = numerical_rank(S, shape, floor_dtype)
    elif not 1 <= r <= S.numel():
        raise ConfigError(f"r must be in 1..{S.numel()} (the directions dW has), got {r}")
    out, inp = shape

    dW_fro = float(S.square().sum().sqrt())
    W_fro = float(torch.linalg.matrix_norm(Wm))
    proj_dW = float(torch.linalg.matrix_norm(U[:, :r].T @ Wm @ V[:, :r]))
    proj_W = None
    if w_directions:
        # W's own top-r directions give U^T W V = diag(sigma_1..r(W)).
        proj_W = float(torch.linalg.svdvals(Wm)[:r].square().sum().sqrt())
    proj_random = None
    if n_random > 0 and r > 0:
        # All draws in one batched QR and matmul: many tiny LAPACK calls cost far more in thread
        # start-up than in arithmetic.
        gen = torch.Generator().manual_seed(seed)
        Ur, _ = torch.linalg.qr(torch.randn(n_random, out, r, generator=gen, dtype=torch.float64))
        Vr, _ = torch.linalg.qr(torch.randn(n_random, inp, r, generator=gen, dtype=torch.float64))
        squares = torch.linalg.matrix_norm(Ur.mT @ Wm @ Vr).square()  # (n_random,)
        proj_random = float(squares.mean().sqrt())
    return {
        "r": r,
        "dW_fro": dW_fro,
        "W_fro": W_fro,
        "proj_dW": proj_dW,
        "proj_W": proj_W,
        "proj_random": proj_random,
        "proj_random_expected": r / math.sqrt(out * inp) * W_fro,
        "amplification": dW_fro / proj_dW if proj_dW > 0 else None,
        "n_random": n_random,
        "seed": seed,
    }


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _group(module: str) -> str:
    # "model.layers.3.self_attn.q_proj" -> "model.layers.*.self_attn.q_proj": one figure per kind
    # of module, one panel per layer.
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", module)


def _panel_title(module: str) -> str:
    numbers = re.findall(r"(?<=\.)\d+(?=\.|$)", module)
    return f"layer {'.'.join(numbers)}" if numbers else module


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("*", "N"))[:100].strip("_.") or "module"


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    # A reader never sees a half-written file (lorakit.io.atomic_write: temp file, fsync, rename).
    path.parent.mkdir(parents=True, exist_ok=True)

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _pick(modules: list[str], max_panels: int) -> list[str]:
    # Evenly spaced layers, first and last included, when there are more than fit.
    if len(modules) <= max_panels:
        return modules
    idx = sorted({round(k * (len(modules) - 1) / (max_panels - 1)) for k in range(max_panels)})
    return [modules[k] for k in idx]


def _save_figure(fig: Any, path: Path) -> None:
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot_similarity(
    phi: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    title: str = "",
    labels: tuple[str, str] = ("a", "b"),
    max_panels: int = 16,
) -> Path:
    """Heatmaps of phi(i, j), one panel per module (the layers of one module kind), like Figures 3-4.

    Args:
        phi: module -> (r1, r2) phi matrix; more than `max_panels` modules are thinned evenly.
        path: the PNG to write (atomically).
        title: figure title.
        labels: names of the two adapters, for the axis labels.
        max_panels: most panels in the grid.

    Returns:
        The path written.
    """
    from matplotlib.figure import Figure

    modules = _pick(sorted(phi, key=_natural_key), max_panels)
    n = len(modules)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    # A fixed layout in inches (panels 3.4 x 3.0, room for labels, title and colorbar): as readable as
    # matplotlib's constrained layout and several times faster to draw for a grid of heatmaps.
    width, height = 3.4 * cols + 1.4, 3.0 * rows + 1.0
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": 0.75 / width, "right": 1 - 1.2 / width, "bottom": 0.6 / height, "top": 1 - 0.95 / height,
        "wspace": 0.4, "hspace": 0.55})
    image = None
    for ax, module in zip(axes.flat, modules):
        m = phi[module].detach().cpu().double().numpy()
        r1, r2 = m.shape
        # extent puts cell (i, j) at integer coordinates, so ticks read as i and j directly.
        image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
        ax.set_title(_panel_title(module), fontsize=10)
        ax.set_xlabel(f"j (top-j of {labels[1]}, r={r2})", fontsize=9)
        ax.set_ylabel(f"i (top-i of {labels[0]}, r={r1})", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if image is not None:
        cax = fig.add_axes((1 - 0.95 / width, 0.6 / height, 0.15 / width, 1 - 1.55 / height))
        fig.colorbar(image, cax=cax, label="phi(i, j)")
    fig.suptitle(title or "normalized subspace similarity phi(i, j)", fontsize=12)
    path = Path(path)
    _save_figure(fig, path)
    return path


def plot_spectra(
    spectra: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    title: str = "",
    ranks: Mapping[str, int] | None = None,
) -> Path:
    """Singular values of dW per module (normalized by the largest, log scale), and the effective
    rank / 90% / 99% energy ranks per module.

    Args:
        spectra: module -> (k,) singular values of dW, descending.
        path: the PNG to write (atomically).
        title: figure title.
        ranks: module -> adapter rank r, drawn as the ceiling of the rank panel.

    Returns:
        The path written.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    modules = sorted(spectra, key=_natural_key)
    fig = Figure(figsize=(11, 4.6))
    ax_s, ax_r = fig.subplots(1, 2, gridspec_kw={"left": 0.07, "right": 0.98, "bottom": 0.2, "top": 0.84,
                                                  "wspace": 0.2})
    cmap = colormaps["viridis"]
    for n, module in enumerate(modules):
        S = spectra[module].detach().cpu().double()
        if S.numel() == 0 or float(S[0]) <= 0:
            continue
        values = (S / S[0]).clamp_min(1e-16).numpy()
        ax_s.plot(range(1, len(values) + 1), values, marker="o", markersize=3, linewidth=1,
                  color=cmap(n / max(1, len(modules) - 1)), label=_panel_title(module))
    ax_s.set_yscale("log")
    ax_s.set_xlabel("k")
    ax_s.set_ylabel("sigma_k / sigma_1")
    ax_s.set_title("singular values of dW")
    ax_s.xaxis.get_major_locator().set_params(integer=True)
    if 0 < len(modules) <= 12:
        ax_s.legend(fontsize=7)
    x = list(range(len(modules)))
    measures = [[f(spectra[m]) for m in modules] for f in
                (effective_rank, lambda s: energy_rank(s, 0.9), lambda s: energy_rank(s, 0.99))]
    for values, label, marker in zip(measures, ("effective rank", "90% energy", "99% energy"), "osd"):
        ax_r.plot(x, values, marker=marker, linewidth=1, label=label)
    if ranks:
        ax_r.plot(x, [ranks.get(m, math.nan) for m in modules], color="gray", linestyle="--", linewidth=1,
                  label="adapter r")
    ax_r.set_xticks(x, [_panel_title(m) for m in modules], rotation=60 if len(modules) > 6 else 0,
                    ha="right" if len(modules) > 6 else "center", fontsize=8)
    ax_r.set_ylabel("rank")
    ax_r.set_ylim(bottom=0)
    ax_r.set_title("rank of dW")
    ax_r.legend(fontsize=8)
    fig.suptitle(title or "spectrum of dW", fontsize=12)
    path = Path(path)
    _save_figure(fig, path)
    return path


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _progress(items: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    # disable=None: bars on a terminal, silence in logs and pipes.
    return tqdm(items, desc=desc, leave=False, disable=None)


def _load(
    adapter: str | os.PathLike[str] | Mapping[str, AdapterTensors],
) -> tuple[dict[str, AdapterTensors], str | None]:
    if isinstance(adapter, Mapping):
        return dict(adapter), None
    return read_adapter(adapter), str(adapter)


def _base_weight(base_weights: Mapping[str, Tensor], module: str) -> Tensor | None:
    # A model's state_dict names the weight "<module>.weight"; accept both spellings.
    w = base_weights.get(module)
    return base_weights.get(f"{module}.weight") if w is None else w


def _matrix(m: Tensor) -> list[list[float]]:
    return [[round(float(x), 6) for x in row] for row in m]


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return {"count": len(values), "mean": sum(values) / len(values), "median": median,
            "min": ordered[0], "max": ordered[-1]}


def analyze(
    adapter_a: str | os.PathLike[str] | Mapping[str, AdapterTensors],
    adapter_b: str | os.PathLike[str] | Mapping[str, AdapterTensors] | None = None,
    base_weights: Mapping[str, Tensor] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    factor: str = "A",
    include_matrices: bool = True,
    plots: bool = True,
    max_panels: int = 16,
    n_random: int = 8,
    seed: int = 0,
    w_directions: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the Section 7 analysis over whole adapters and return a JSON-serializable report.

    For every module of adapter_a (and of adapter_b when given): the spectrum of dW; with
    base_weights, the amplification of W's directions; with adapter_b, phi(i, j) between the two
    adapters' `factor` matrices for every module they share.

    Args:
        adapter_a: an adapter directory, or module -> AdapterTensors (from `read_adapter`).
        adapter_b: a second adapter (another rank or seed) to compare with, or None.
        base_weights: module path (or "<module path>.weight") -> the base module's weight, in the
            module's own layout; modules without an entry get no amplification.
        out_dir: when given, writes analysis.json, similarity_<module kind>.png (phi heatmaps, one
            panel per layer) and spectrum_<module kind>.png there, each atomically.
        factor: "A" (the paper's choice) or "B" for the similarity.
        include_matrices: put the full phi matrices in the report (rounded to 6 decimals).
        plots: write the PNGs (needs matplotlib; skipped with a warning when it is missing).
        max_panels: most layers per similarity figure.
        n_random, seed, w_directions: passed to `amplification`.
        progress: show progress bars.

    Returns:
        {"adapters", "modules" (per module: "shape", "kind", "a"/"b" with "r", "alpha", "scale",
        "spectrum" and optionally "amplification", and "similarity" when compared), "only_in_a",
        "only_in_b", "skipped" (module -> reasons a part of the analysis was left out), "summary",
        "files"}.

    Raises:
        AdapterFileError: an adapter directory cannot be read.
        ShapeMismatchError: a base weight does not fit its module.
        ConfigError: factor is neither "A" nor "B".
    """
    if factor not in ("A", "B"):
        raise ConfigError(f'factor must be "A" or "B", got {factor!r}')
    a, path_a = _load(adapter_a)
    b, path_b = _load(adapter_b) if adapter_b is not None else ({}, None)
    labels = ("a", "b")
    report: dict[str, Any] = {
        "adapters": {"a": {"path": path_a, "modules": len(a)}},
        "modules": {},
        "only_in_a": [],
        "only_in_b": [],
        "skipped": {},
        "summary": {},
        "files": [],
    }
    if adapter_b is not None:
        report["adapters"]["b"] = {"path": path_b, "modules": len(b)}

    def skip(module: str, reason: str) -> None:
        report["skipped"].setdefault(module, []).append(reason)

    spectra: dict[str, dict[str, Tensor]] = {"a": {}, "b": {}}
    names = list(a) + [m for m in b if m not in a]
    for module in _progress(names, progress, "spectrum and amplification"):
        entry: dict[str, Any] = {}
        for label, adapter in (("a", a), ("b", b)):
            t = adapter.get(module)
            if t is None:
                continue
            entry.setdefault("shape", list(t.shape))
            entry.setdefault("kind", t.kind)
            _, S, _ = delta_svd(t.B, t.A, t.scale)
            spectra[label][module] = S
            result: dict[str, Any] = {"r": t.r, "alpha": t.alpha, "scale": t.scale,
                                      "spectrum": spectrum_report(S, t.r)}
            W = _base_weight(base_weights, module) if base_weights is not None else None
            if W is not None:
                if float(S.max()) > 0:
                    result["amplification"] = amplification(t, W, n_random=n_random, seed=seed,
                                                             w_directions=w_directions)
                else:
                    skip(module, f"dW is zero in adapter {label} (untrained?): no amplification")
            elif base_weights is not None:
                skip(module, f"no base weight given: no amplification for adapter {label}")
            entry[label] = result
        report["modules"][module] = entry

    if adapter_b is not None:
        sim = compare_adapters(a, b, factor=factor, progress=progress)
        report["only_in_a"], report["only_in_b"] = sim.only_in_a, sim.only_in_b
        for module, reason in sim.skipped.items():
            skip(module, f"no similarity: {reason}")
        for module, phi in sim.phi.items():
            d = a[module].shape[1] if factor == "A" else a[module].shape[0]
            n = min(phi.shape)
            s: dict[str, Any] = {
                "factor": factor,
                "phi_top1": float(phi[0, 0]),
                "phi_diagonal": [float(phi[k, k]) for k in range(n)],
                "phi_full": float(phi[-1, -1]),
                "random_top1": 1.0 / d,
            }
            if include_matrices:
                s["phi"] = _matrix(phi)
            report["modules"][module]["similarity"] = s

    report["summary"] = _summary(report["modules"], adapter_b is not None)

    if out_dir is not None:
        out = Path(out_dir)
        files: list[str] = []
        if plots:
            try:
                import matplotlib  # noqa: F401  (only to find out whether plotting is possible)
            except ImportError:
                warnings.warn(
                    "matplotlib is not installed (pip install 'lorakit[plots]'): no plots written", stacklevel=2
                )
            else:
                files += _write_plots(out, report, spectra, sim.phi if adapter_b is not None else {},
                                      factor, labels, max_panels)
        files.append(str(out / "analysis.json"))
        report["files"] = files
        text = json.dumps(report, indent=1, allow_nan=False)
        _atomic_write(out / "analysis.json", lambda f: f.write(text.encode("utf-8")))
    return report


def _summary(modules: Mapping[str, Any], compared: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {"modules": len(modules)}
    for label in ("a", "b") if compared else ("a",):
        sides = [e[label] for e in modules.values() if label in e]
        summary[label] = {
            "effective_rank": _stats([s["spectrum"]["effective_rank"] for s in sides]),
            "rank_90": _stats([s["spectrum"]["rank_90"] for s in sides]),
            "rank_99": _stats([s["spectrum"]["rank_99"] for s in sides]),
            "amplification": _stats([s["amplification"]["amplification"] for s in sides
                                     if s.get("amplification", {}).get("amplification") is not None]),
        }
    if compared:
        sims = [e["similarity"] for e in modules.values() if "similarity" in e]
        summary["similarity"] = {
            "phi_top1": _stats([s["phi_top1"] for s in sims]),
            "phi_full": _stats([s["phi_full"] for s in sims]),
        }
    return summary


def _write_plots(
    out: Path,
    report: Mapping[str, Any],
    spectra: Mapping[str, Mapping[str, Tensor]],
    phi: Mapping[str, Tensor],
    factor: str,
    labels: tuple[str, str],
    max_panels: int,
) -> list[str]:
    files: list[str] = []
    used: set[str] = set()

    def name(prefix: str, group: str) -> Path:
        stem, k = f"{prefix}_{_slug(group)}", 2
        while stem in used:  # distinct groups can share a slug after sanitizing
            stem, k = f"{prefix}_{_slug(group)}_{k}", k + 1
        used.add(stem)
        return out / f"{stem}.png"

    groups: dict[str, list[str]] = {}
    for module in phi:
        groups.setdefault(_group(module), []).append(module)
    for group, modules in groups.items():
        ra = {report["modules"][m]["a"]["r"] for m in modules}
        rb = {report["modules"][m]["b"]["r"] for m in modules}
        title = (f"phi({factor}_a, {factor}_b, i, j), r_a={'/'.join(map(str, sorted(ra)))}, "
                 f"r_b={'/'.join(map(str, sorted(rb)))}\n{group}")
        files.append(str(plot_similarity({m: phi[m] for m in modules}, name("similarity", group),
                                         title=title, labels=labels, max_panels=max_panels)))
    for label in ("a", "b"):
        groups = {}
        for module in spectra[label]:
            groups.setdefault(_group(module), []).append(module)
        prefix = "spectrum" if label == "a" else "spectrum_b"
        for group, modules in groups.items():
            title = f"adapter {label}: {group}"
            ranks = {m: report["modules"][m][label]["r"] for m in modules}
            files.append(str(plot_spectra({m: spectra[label][m] for m in modules}, name(prefix, group),
                                          title=title, ranks=ranks)))
    return files
