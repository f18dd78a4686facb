"""Contracts of lorakit.eval.analysis (the paper's Section 7) on synthetic adapters with known answers."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from lorakit.eval.analysis import (
    AdapterTensors,
    amplification,
    analyze,
    compare_adapters,
    delta_svd,
    effective_rank,
    energy_rank,
    plot_similarity,
    read_adapter,
    subspace_similarity,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def orthonormal(n, k, g):
    """(n, k) float64 with orthonormal columns."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def factor_from(directions, values, g):
    """An A factor (r, d) whose right singular vectors are `directions` (d, r), ordered by the
    descending `values`, hidden behind a random rotation of the rank dimension so that the rows of A
    are not themselves the singular vectors."""
    r = directions.shape[1]
    P = orthonormal(r, r, g)
    return P @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ directions.T


def phi_reference(M1, M2, side):
    """phi(i, j) straight from the definition, with numpy in float64."""
    m1, m2 = M1.double().numpy(), M2.double().numpy()
    if side == "right":
        u1, u2 = np.linalg.svd(m1, full_matrices=False)[2].T, np.linalg.svd(m2, full_matrices=False)[2].T
    else:
        u1, u2 = np.linalg.svd(m1, full_matrices=False)[0], np.linalg.svd(m2, full_matrices=False)[0]
    out = np.zeros((u1.shape[1], u2.shape[1]))
    for i in range(1, u1.shape[1] + 1):
        for j in range(1, u2.shape[1] + 1):
            out[i - 1, j - 1] = np.linalg.norm(u1[:, :i].T @ u2[:, :j], "fro") ** 2 / min(i, j)
    return out


# ------------------------------------------------------------------------------ subspace similarity


def test_identical_subspaces_give_phi_one_everywhere():
    g = gen(0)
    A = torch.randn(8, 64, generator=g)
    # Identical A: top-i and top-j subspaces are nested, so ||U_i^T U_j||^2 = min(i, j) and phi = 1.
    assert torch.allclose(subspace_similarity(A, A), torch.ones(8, 8, dtype=torch.float64), atol=1e-10)
    # A rotation of the rank dimension (Q A) keeps the right singular vectors: phi is still all ones.
    Q = orthonormal(8, 8, g).float()
    assert torch.allclose(subspace_similarity(A, Q @ A), torch.ones(8, 8, dtype=torch.float64), atol=1e-6)


def test_known_shared_directions_give_the_counting_pattern():
    g = gen(1)
    d = 40
    Q = orthonormal(d, d, g)
    picks1 = [0, 1, 2, 3, 4]  # A1's directions, strongest first
    picks2 = [2, 10, 0, 11, 12, 1, 13]  # A2's: shares directions 2, 0, 1 at ranks 1, 3, 6
    A1 = factor_from(Q[:, picks1], [5.0, 4.0, 3.0, 2.0, 1.0], g)
    A2 = factor_from(Q[:, picks2], [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], g)
    expected = torch.tensor(
        [[len(set(picks1[:i]) & set(picks2[:j])) / min(i, j) for j in range(1, 8)] for i in range(1, 6)],
        dtype=torch.float64,
    )
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (5, 7)  # rows index A1's top-i, columns A2's top-j
    assert torch.allclose(phi, expected, atol=1e-10)
    # The B factors (out, r) carry the same information in their left singular vectors.
    assert torch.allclose(subspace_similarity(A1.T, A2.T, side="left"), expected, atol=1e-10)


def test_orthogonal_complement_gives_zero():
    g = gen(2)
    Q = orthonormal(48, 48, g)
    A1 = factor_from(Q[:, :6], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], g)
    A2 = factor_from(Q[:, 6:16], [float(10 - k) for k in range(10)], g)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (6, 10)
    assert phi.abs().max() < 1e-12


def test_planted_shared_direction_gives_phi_11_one():
    g = gen(3)
    d = 128
    u = torch.nn.functional.normalize(torch.randn(d, 1, generator=g, dtype=torch.float64), dim=0)
    # Q's first column is +-u and the others are random directions orthogonal to it.
    Q1, _ = torch.linalg.qr(torch.cat([u, torch.randn(d, 7, generator=g, dtype=torch.float64)], 1))
    Q2, _ = torch.linalg.qr(torch.cat([u, torch.randn(d, 15, generator=g, dtype=torch.float64)], 1))
    A1 = factor_from(Q1, [10.0] + [1.0 - 0.05 * k for k in range(7)], g)
    A2 = factor_from(Q2, [10.0] + [1.0 - 0.05 * k for k in range(15)], g)
    phi = subspace_similarity(A1, A2)
    assert phi.shape == (8, 16)
    assert abs(float(phi[0, 0]) - 1.0) < 1e-10
    # u is the top direction of both, so it lies in every top-i and top-j subspace.
    assert torch.allclose(phi[0, :], torch.ones(16, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(phi[:, 0], torch.ones(8, dtype=torch.float64), atol=1e-10)
    # Beyond u the directions are unrelated: phi(2, 2) = (1 + a small random overlap) / 2.
    assert 0.5 - 1e-9 < float(phi[1, 1]) < 0.6


@pytest.mark.parametrize("side", ["right", "left"])
def test_similarity_matches_the_definition(side):
    g = gen(4)
    M1 = torch.randn(5, 20, generator=g)
    M2 = torch.randn(7, 20, generator=g)
    if side == "left":
        M1, M2 = M1.T, M2.T
    np.testing.assert_allclose(subspace_similarity(M1, M2, side=side).numpy(), phi_reference(M1, M2, side), atol=1e-10)


def test_similarity_rejects_bad_input():
    with pytest.raises(ShapeMismatchError):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 12))
    with pytest.raises(ConfigError):
        subspace_similarity(torch.randn(4, 10), torch.randn(4, 10), side="up")


def test_compare_adapters_reports_unshared_and_untrained_modules():
    g = gen(5)

    def t(name, r, zero_b=False):
        B = torch.zeros(16, r) if zero_b else torch.randn(16, r, generator=g)
        return AdapterTensors(name, torch.randn(r, 24, generator=g), B, 1.0, r, float(r))

    a = {"x.q": t("x.q", 4), "x.v": t("x.v", 4), "x.k": t("x.k", 4)}
    b = {"x.q": t("x.q", 8), "x.v": t("x.v", 8, zero_b=True), "x.o": t("x.o", 8)}
    res = compare_adapters(a, b, factor="A")
    assert set(res.phi) == {"x.q", "x.v"} and res.phi["x.q"].shape == (4, 8)
    assert res.only_in_a == ["x.k"] and res.only_in_b == ["x.o"]
    # A zero B has no singular directions to compare.
    res_b = compare_adapters(a, b, factor="B")
    assert set(res_b.phi) == {"x.q"} and "all zeros" in res_b.skipped["x.v"]


# ------------------------------------------------------------------------------------- spectrum


def test_delta_svd_recovers_known_singular_values():
    g = gen(6)
    out, inp, r = 40, 30, 6
    sigma = torch.tensor([9.0, 5.0, 4.0, 2.5, 1.0, 0.3], dtype=torch.float64)
    U0, V0 = orthonormal(out, r, g), orthonormal(inp, r, g)
    # dW = U0 diag(sigma) V0^T split unevenly between the factors through an invertible P.
    P = orthonormal(r, r, g) @ torch.diag(torch.tensor([2.0, 0.5, 1.0, 3.0, 0.7, 1.3], dtype=torch.float64))
    B = U0 @ torch.diag(sigma) @ P
    A = torch.linalg.inv(P) @ V0.T
    U, S, V = delta_svd(B, A, scale=0.5)
    assert torch.allclose(S, 0.5 * sigma, rtol=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ V.T, 0.5 * U0 @ torch.diag(sigma) @ V0.T, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(r, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(r, dtype=torch.float64), atol=1e-10)


def test_delta_svd_when_rank_exceeds_a_dimension():
    g = gen(7)
    B, A = torch.randn(4, 8, generator=g), torch.randn(8, 30, generator=g)
    _, S, _ = delta_svd(B, A, scale=2.0)
    assert S.shape == (4,)
    assert torch.allclose(S, torch.linalg.svdvals(2.0 * B.double() @ A.double()), rtol=1e-10)


def test_delta_svd_does_not_form_dw():
    # dW would be 10^6 x 10^6 (8 TB in float64): only the thin factors fit in memory.
    g = gen(8)
    n, r = 1_000_000, 2
    B, A = torch.randn(n, r, generator=g), torch.randn(r, n, generator=g)
    _, S, _ = delta_svd(B, A)
    expected = torch.linalg.svdvals((B.double().T @ B.double()) @ (A.double() @ A.double().T)).sqrt()
    assert torch.allclose(S.sort().values, expected.sort().values, rtol=1e-8)


def test_effective_rank_of_equal_spectrum_is_k():
    g = gen(9)
    out, inp, r, k = 24, 20, 8, 3
    # A rank-8 adapter whose dW has exactly 3 equal singular values (2.0): B A = 2 U0 V0^T.
    M = orthonormal(r, k, g).T  # (k, r), orthonormal rows
    B = 2.0 * orthonormal(out, k, g) @ M
    A = M.T @ orthonormal(inp, k, g).T
    _, S, _ = delta_svd(B, A)
    assert effective_rank(S) == pytest.approx(3.0, abs=1e-6)
    assert energy_rank(S, 0.9) == 3 and energy_rank(S, 0.99) == 3
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])) == pytest.approx(4.0, abs=1e-12)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, exp(H) = 2^1.5.
    assert effective_rank(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(2**1.5, abs=1e-12)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_energy_rank():
    # Energies 9, 4, 1 of 14: two values hold 13/14 = 92.9%.
    S = torch.tensor([3.0, 2.0, 1.0])
    assert energy_rank(S, 0.9) == 2 and energy_rank(S, 0.99) == 3 and energy_rank(S, 0.5) == 1
    assert energy_rank(torch.ones(10), 0.9) == 9 and energy_rank(torch.ones(10), 0.99) == 10
    # Eight of ten equal energies of 0.1 are 80%, though their rounded prefix sum is 0.7999999999999999.
    assert energy_rank(torch.full((10,), 0.1**0.5, dtype=torch.float64), 0.8) == 8
    assert energy_rank(torch.zeros(3), 0.9) == 0
    with pytest.raises(ConfigError):
        energy_rank(S, 0.0)


# -------------------------------------------------------------------------------- amplification


def amplification_reference(dW, W, r):
    """Table 7's numbers from the definition, with numpy in float64."""
    dw, w = dW.double().numpy(), W.double().numpy()
    u, _, vt = np.linalg.svd(dw)
    proj = np.linalg.norm(u[:, :r].T @ w @ vt[:r].T, "fro")
    top_w = np.sqrt(np.sum(np.linalg.svd(w, compute_uv=False)[:r] ** 2))
    return {"dW_fro": np.linalg.norm(dw, "fro"), "W_fro": np.linalg.norm(w, "fro"), "proj_dW": proj,
            "proj_W": top_w, "amplification": np.linalg.norm(dw, "fro") / proj}


def check_against_reference(result, ref):
    for key, value in ref.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key


def test_amplification_of_dw_aligned_with_w_top_directions():
    g = gen(10)
    out, inp, r = 30, 20, 2
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    Uw, Sw, Vhw = torch.linalg.svd(W, full_matrices=False)
    dW = Uw[:, :r] @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ Vhw[:r]
    res = amplification(dW, W, n_random=0)
    check_against_reference(res, amplification_reference(dW, W, r))
    # dW's directions are W's own: the projection is W's top-r energy, amplification = ||c|| / that.
    assert res["r"] == r
    assert res["proj_dW"] == pytest.approx(float(Sw[:r].norm()), rel=1e-10)
    assert res["proj_dW"] == pytest.approx(res["proj_W"], rel=1e-10)
    assert res["amplification"] == pytest.approx(math.sqrt(13.0) / float(Sw[:r].norm()), rel=1e-10)


def test_amplification_of_random_dw_matches_reference_and_random_baseline():
    g = gen(11)
    out, inp, r = 48, 40, 4
    W = torch.randn(out, inp, generator=g)
    B, A = torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g)
    t = AdapterTensors("m", A, B, 0.75, r, 3.0)
    dW = t.delta()
    ref = amplification_reference(dW, W, r)
    dense = amplification(dW, W, n_random=400, seed=1)
    factored = amplification(t, W, n_random=400, seed=1)
    check_against_reference(dense, ref)
    check_against_reference(factored, ref)
    # Random r-dim subspaces: E||U^T W V||_F^2 = (r / out)(r / in) ||W||_F^2.
    expected = r / math.sqrt(out * inp) * ref["W_fro"]
    assert factored["proj_random_expected"] == pytest.approx(expected, rel=1e-12)
    assert factored["proj_random"] == pytest.approx(expected, rel=0.1)
    # GPT-2 Conv1D stores the weight as (in, out): the same numbers from the transposed weight.
    check_against_reference(amplification(t, W.T.contiguous(), n_random=0), ref)


def test_amplification_rank_follows_the_precision_of_dw():
    g = gen(12)
    B, A = torch.randn(30, 3, generator=g), torch.randn(3, 25, generator=g)
    W = torch.randn(30, 25, generator=g)
    # float32 rounding puts noise of ~1e-7 relative in every direction; that is not rank.
    assert amplification((B @ A).float(), W, n_random=0)["r"] == 3
    assert amplification(B.double() @ A.double(), W, n_random=0)["r"] == 3
    assert amplification(B @ A, W, r=2, n_random=0)["r"] == 2
    with pytest.raises(ConfigError):
        amplification(B @ A, W, r=26)
    with pytest.raises(ShapeMismatchError):
        amplification(B @ A, W.T)


# ------------------------------------------------------------------------------------- reading


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.2.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
]


def write_adapter(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def peft_tensors(g, ranks, out=16, inp=12, embedding=None):
    """PEFT key layout: base_model.model.<module>.lora_A.weight (r, in) / lora_B.weight (out, r)."""
    tensors = {}
    for module, r in ranks.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inp, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, r, generator=g)
    if embedding is not None:
        num, dim, r = embedding
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(r, num, generator=g)
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(dim, r, generator=g)
    return tensors


CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "use_rslora": False,
    "rank_pattern": {"v_proj": 2},
    # "up" must not match "up_proj" (PEFT anchors patterns at a dot and at the end).
    "alpha_pattern": {"layers.1.self_attn.q_proj": 32, "up": 99},
}


def test_read_adapter_round_trips_a_peft_directory(tmp_path):
    g = gen(13)
    ranks = {m: (2 if m.endswith("v_proj") else 4) for m in MODULES}
    tensors = peft_tensors(g, ranks, embedding=(50, 16, 4))
    path = write_adapter(tmp_path / "ad", CONFIG, tensors)
    ad = read_adapter(path)
    # Natural order: layer 0, 1, 2, then 10.
    assert list(ad) == [
        "model.embed_tokens",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
    ]
    for m in MODULES:
        assert torch.equal(ad[m].A, tensors[f"base_model.model.{m}.lora_A.weight"])
        assert torch.equal(ad[m].B, tensors[f"base_model.model.{m}.lora_B.weight"])
        assert ad[m].kind == "linear" and ad[m].r == ranks[m] and ad[m].weight_shape == (16, 12)
    scales = {m: t.scale for m, t in ad.items()}
    assert scales == {
        "model.embed_tokens": 2.0,
        "model.layers.0.mlp.up_proj": 2.0,
        "model.layers.0.self_attn.q_proj": 2.0,
        "model.layers.0.self_attn.v_proj": 4.0,  # rank_pattern r=2: 8 / 2
        "model.layers.1.self_attn.q_proj": 8.0,  # alpha_pattern 32: 32 / 4
        "model.layers.2.self_attn.q_proj": 2.0,
        "model.layers.10.self_attn.q_proj": 2.0,
    }
    emb = ad["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.shape == (16, 50) and emb.weight_shape == (50, 16)
    # PEFT: the embedding weight (num, dim) changes by (s * B @ A)^T.
    peft_delta = (tensors["base_model.model.model.embed_tokens.lora_embedding_B"].double()
                  @ tensors["base_model.model.model.embed_tokens.lora_embedding_A"].double()).T * 2.0
    assert torch.allclose(emb.delta().T, peft_delta, atol=1e-12)
    # The embedding's own weight (num, dim) is read in dW's (dim, num) layout.
    W_emb = torch.randn(50, 16, generator=g)
    check_against_reference(amplification(emb, W_emb, n_random=0), amplification_reference(emb.delta(), W_emb.T, 4))
    # A square embedding is transposed too: its weight is (num, dim) whatever the sizes.
    square = AdapterTensors("e", torch.randn(4, 16, generator=g), torch.randn(16, 4, generator=g), 1.0, 4, 4.0,
                            "embedding", (16, 16))
    W_sq = torch.randn(16, 16, generator=g)
    check_against_reference(amplification(square, W_sq, n_random=0), amplification_reference(square.delta(), W_sq.T, 4))
    # The safetensors file itself names the adapter too.
    assert list(read_adapter(path / "adapter_model.safetensors")) == list(ad)


def test_read_adapter_accepts_keys_with_the_adapter_name(tmp_path):
    g = gen(18)
    A, B = torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g)
    path = write_adapter(tmp_path / "ad", CONFIG, {"base_model.model.m.q_proj.lora_A.default.weight": A,
                                                   "base_model.model.m.q_proj.lora_B.default.weight": B})
    ad = read_adapter(path)
    assert list(ad) == ["m.q_proj"] and torch.equal(ad["m.q_proj"].A, A) and torch.equal(ad["m.q_proj"].B, B)


def test_read_adapter_rslora_scale(tmp_path):
    g = gen(14)
    config = dict(CONFIG, use_rslora=True, alpha_pattern={})
    path = write_adapter(tmp_path / "ad", config, peft_tensors(g, {"m.q_proj": 4, "m.v_proj": 2}))
    ad = read_adapter(path)
    assert ad["m.q_proj"].scale == pytest.approx(8 / 2.0)
    assert ad["m.v_proj"].scale == pytest.approx(8 / math.sqrt(2))


def test_read_adapter_errors_name_the_file(tmp_path):
    g = gen(15)
    good = peft_tensors(g, {"m.q_proj": 4})
    with pytest.raises(AdapterFileError, match="no such adapter directory"):
        read_adapter(tmp_path / "missing")

    (tmp_path / "noconfig").mkdir()
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        read_adapter(tmp_path / "noconfig")

    bad_json = write_adapter(tmp_path / "badjson", CONFIG, good)
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        read_adapter(bad_json)

    corrupt = write_adapter(tmp_path / "corrupt", CONFIG, good)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage that is not a header")
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        read_adapter(corrupt)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(CONFIG))
    (pickled / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(AdapterFileError, match="adapter_model.bin"):
        read_adapter(pickled)

    wrong_r = write_adapter(tmp_path / "wrongr", dict(CONFIG, r=8), good)
    with pytest.raises(AdapterFileError, match="m.q_proj has rank 4"):
        read_adapter(wrong_r)

    no_b = write_adapter(tmp_path / "nob", CONFIG, {"base_model.model.m.q_proj.lora_A.weight": torch.randn(4, 3)})
    with pytest.raises(AdapterFileError, match="m.q_proj has no lora_B"):
        read_adapter(no_b)

    two_names = write_adapter(tmp_path / "twonames", CONFIG, {
        "base_model.model.m.q_proj.lora_A.first.weight": torch.randn(4, 3),
        "base_model.model.m.q_proj.lora_B.first.weight": torch.randn(5, 4),
        "base_model.model.m.v_proj.lora_A.second.weight": torch.randn(4, 3),
        "base_model.model.m.v_proj.lora_B.second.weight": torch.randn(5, 4)})
    with pytest.raises(AdapterFileError, match="several adapters"):
        read_adapter(two_names)

    empty = write_adapter(tmp_path / "empty", CONFIG, {"base_model.model.m.weight": torch.randn(4, 3)})
    with pytest.warns(UserWarning, match="not LoRA factors"), pytest.raises(AdapterFileError, match="no LoRA factors"):
        read_adapter(empty)


def test_read_adapter_agrees_with_load_adapter(tmp_path):
    """One reader: the dW that `read_adapter` reports is the one `load_adapter` + `merge` adds to W,
    for per-module ranks and alphas and rsLoRA scaling, and a DoRA file is refused by both."""
    import lorakit as lk

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["0", "2"], rslora=True,
                                   rank_pattern={"2": 2}, alpha_pattern={"0": 5.0}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lk.save_adapter(model, tmp_path / "ad")
    ad = read_adapter(tmp_path / "ad")
    assert ad["0"].scale == pytest.approx(5.0 / 2.0) and ad["2"].scale == pytest.approx(8 / math.sqrt(2))

    fresh = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    fresh.load_state_dict({k.replace("_base.", ""): v for k, v in model.state_dict().items() if "adapters" not in k})
    before = {m: fresh.get_submodule(m).weight.detach().double().clone() for m in ("0", "2")}
    lk.load_adapter(fresh, tmp_path / "ad")
    lk.merge(fresh)
    for m in ("0", "2"):
        merged = fresh.get_submodule(m).weight.detach().double()
        assert torch.allclose(merged - before[m], ad[m].delta(), atol=1e-5)

    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(AdapterFileError, match="DoRA"):
        read_adapter(tmp_path / "ad")


# ---------------------------------------------------------------------------------------- driver


def two_adapters(tmp_path, g, out=16, inp=12, extra=True):
    """Adapter a on disk (rank 4) and adapter b in memory (rank 8) whose A factors contain a's rows,
    so a's subspace lies inside b's; b's layer-1 q_proj is untrained (B = 0). With `extra`, a also
    has a v_proj and b an up_proj that the other lacks."""
    q = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    ranks = {q[0]: 4, q[1]: 4}
    if extra:
        ranks["model.layers.0.self_attn.v_proj"] = 4
    path_a = write_adapter(tmp_path / "a", dict(CONFIG, rank_pattern={}, alpha_pattern={}),
                           peft_tensors(g, ranks, out, inp))
    a = read_adapter(path_a)
    b = {}
    for m in q:
        A = torch.cat([a[m].A, torch.randn(4, inp, generator=g)])
        B = torch.zeros(out, 8) if m == q[1] else torch.randn(out, 8, generator=g)
        b[m] = AdapterTensors(m, A, B, 2.0, 8, 16.0)
    if extra:
        up = "model.layers.0.mlp.up_proj"
        b[up] = AdapterTensors(up, torch.randn(8, inp, generator=g), torch.randn(out, 8, generator=g), 2.0, 8, 16.0)
    return path_a, a, b, q


def test_analyze_report(tmp_path):
    g = gen(16)
    out, inp = 16, 12
    path_a, a, b, q = two_adapters(tmp_path, g, out, inp)
    v, up = "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"
    # Base weights under "<module>.weight" (a state_dict) or the bare module path; none for v_proj.
    base = {f"{q[0]}.weight": torch.randn(out, inp, generator=g), q[1]: torch.randn(out, inp, generator=g)}

    report = analyze(path_a, b, base_weights=base, n_random=4, progress=False)

    assert report["only_in_a"] == [v] and report["only_in_b"] == [up]
    mods = report["modules"]
    # a's 4-dim subspace lies in b's 8-dim one: phi(4, 8) = ||U_4^T V_8||^2 / 4 = 1.
    sim = mods[q[0]]["similarity"]
    assert len(sim["phi"]) == 4 and len(sim["phi"][0]) == 8
    assert sim["phi"][3][7] == pytest.approx(1.0, abs=1e-6) and sim["phi_full"] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(sim["phi"], phi_reference(a[q[0]].A, b[q[0]].A, "right"), atol=1e-6)
    assert sim["random_top1"] == pytest.approx(1 / inp)
    # Spectra and amplification agree with the functions they come from.
    _, S, _ = delta_svd(a[q[0]].B, a[q[0]].A, a[q[0]].scale)
    assert mods[q[0]]["a"]["spectrum"]["singular_values"] == pytest.approx(S.tolist(), rel=1e-12)
    assert mods[q[0]]["a"]["spectrum"]["effective_rank"] == pytest.approx(effective_rank(S), rel=1e-12)
    check_against_reference(mods[q[0]]["a"]["amplification"],
                            amplification_reference(a[q[0]].delta(), base[f"{q[0]}.weight"], 4))
    # b's untrained module (B = 0): zero spectrum, no amplification; its A factors still compare.
    assert "amplification" in mods[q[1]]["a"] and "amplification" not in mods[q[1]]["b"]
    assert mods[q[1]]["b"]["spectrum"]["effective_rank"] == 0.0
    assert "amplification" not in mods[v]["a"]
    assert report["skipped"][v] == ["no base weight given: no amplification for adapter a"]
    assert report["skipped"][q[1]] == ["dW is zero in adapter b (untrained?): no amplification"]
    assert report["summary"]["modules"] == 4 and report["summary"]["similarity"]["phi_full"]["count"] == 2
    assert report["summary"]["a"]["amplification"]["count"] == 2
    assert report["files"] == []
    json.dumps(report, allow_nan=False)  # JSON-serializable as it is


def test_analyze_writes_json_and_pngs(tmp_path):
    g = gen(17)
    path_a, a, b, q = two_adapters(tmp_path, g, extra=False)
    report = analyze(path_a, b, out_dir=tmp_path / "out", progress=False)

    def no_nan(constant):
        raise AssertionError(f"non-JSON constant {constant} in analysis.json")

    text = (tmp_path / "out" / "analysis.json").read_text()
    assert json.loads(text, parse_constant=no_nan) == json.loads(json.dumps(report))
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {
        "analysis.json",
        "similarity_model.layers.N.self_attn.q_proj.png",
        "spectrum_model.layers.N.self_attn.q_proj.png",
        "spectrum_b_model.layers.N.self_attn.q_proj.png",
    }  # and no temporary files left behind
    assert sorted(report["files"]) == sorted(str(tmp_path / "out" / f) for f in files)
    for name in files - {"analysis.json"}:
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_replaces_atomically(tmp_path, monkeypatch):
    phi = {"m.0.q": torch.rand(4, 8, dtype=torch.float64)}
    target = tmp_path / "sim.png"
    target.write_bytes(b"previous")
    from matplotlib.figure import Figure

    def failing_savefig(self, f, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_similarity(phi, target)
    # A failed write leaves the previous file whole and no temporary file behind.
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["sim.png"]
