"""The adapter inspector against dense float64 references: spectra, norms, cosine, subspace similarity."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import minilora
from minilora.adapter import CONFIG_NAME, WEIGHTS_NAME, peft_key
from minilora.inspect import compare_adapters, inspect, main, update_svd
from minilora.lora import dequantize_weight
from minilora.training.cli import run_cli

# fp32 factors, float64 math on both sides: agreement far inside the 1e-4 relative goal.
REL = dict(rtol=1e-4, atol=0)
SHAPES = {"model.layers.0.self_attn.qkv_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40),
          "model.layers.1.self_attn.qkv_proj": (24, 16), "model.layers.1.mlp.down_proj": (16, 40)}


def write_adapter(folder, seed, r=4, alpha=8.0, rslora=False, shapes=SHAPES, zero=()):
    """A random adapter on disk; returns {name: dense float64 update}."""
    g = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    for name, (out_f, in_f) in shapes.items():
        a = torch.randn(r, in_f, generator=g)
        b = torch.zeros(out_f, r) if name in zero else torch.randn(out_f, r, generator=g)
        tensors[peft_key(name, "lora_A")], tensors[peft_key(name, "lora_B")] = a, b
        dense[name] = scale * b.double() @ a.double()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": sorted({n.rpartition(".")[2] for n in shapes})}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return dense


def effective_rank(s):
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


@pytest.mark.parametrize("rslora", [False, True])
def test_spectra_and_norms_equal_a_dense_float64_svd(tmp_path, rslora):
    dense = write_adapter(tmp_path / "a", seed=0, rslora=rslora)
    report = inspect(tmp_path / "a")
    assert [m["name"] for m in report["modules"]] == sorted(SHAPES)
    for row in report["modules"]:
        s = torch.linalg.svdvals(dense[row["name"]])[:4]
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), s, **REL)
        assert row["rank"] == 4 and row["numerical_rank"] == 4
        assert row["delta_fro"] == pytest.approx(dense[row["name"]].norm().item(), rel=1e-4)
        assert row["stable_rank"] == pytest.approx((s**2).sum().item() / s[0].item() ** 2, rel=1e-4)
        assert row["effective_rank"] == pytest.approx(effective_rank(s), rel=1e-4)
        assert 1 <= row["effective_rank"] <= 4


def test_left_singular_vectors_span_the_updates_column_space():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 20, generator=g).double(), torch.randn(30, 3, generator=g).double()
    s, u = update_svd(a, b, 2.0)
    torch.testing.assert_close(u.T @ u, torch.eye(3, dtype=torch.float64))
    u_ref = torch.linalg.svd(2.0 * b @ a).U[:, :3]
    torch.testing.assert_close((u.T @ u_ref).abs(), torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_rank_deficient_and_zero_updates(tmp_path):
    name = "model.layers.0.mlp.down_proj"
    write_adapter(tmp_path / "a", seed=1, shapes={name: (16, 40), "model.layers.1.mlp.down_proj": (16, 40)},
                  zero={"model.layers.1.mlp.down_proj"})
    tensors = {peft_key(name, "lora_A"): torch.randn(4, 40),
               peft_key(name, "lora_B"): torch.randn(16, 1).repeat(1, 4)}  # rank-1 update
    tensors[peft_key("model.layers.1.mlp.down_proj", "lora_A")] = torch.randn(4, 40)
    tensors[peft_key("model.layers.1.mlp.down_proj", "lora_B")] = torch.zeros(16, 4)
    save_file(tensors, str(tmp_path / "a" / WEIGHTS_NAME))
    rank1, zero = inspect(tmp_path / "a")["modules"]
    assert rank1["numerical_rank"] == 1
    assert rank1["effective_rank"] == pytest.approx(1, abs=1e-5) and rank1["stable_rank"] == pytest.approx(1)
    assert zero["delta_fro"] == zero["effective_rank"] == zero["stable_rank"] == 0.0
    assert zero["numerical_rank"] == 0


def test_compare_matches_the_definitions_on_dense_updates(tmp_path):
    d1 = write_adapter(tmp_path / "a", seed=0)
    d2 = write_adapter(tmp_path / "b", seed=1, r=2, alpha=4.0)
    rows = {m["name"]: m for m in compare_adapters(tmp_path / "a", tmp_path / "b")["modules"]}
    for name in SHAPES:
        m1, m2 = d1[name], d2[name]
        cosine = (m1 * m2).sum() / (m1.norm() * m2.norm())
        k = 2  # the smaller numerical rank
        u1, u2 = torch.linalg.svd(m1).U[:, :k], torch.linalg.svd(m2).U[:, :k]
        assert rows[name]["cosine"] == pytest.approx(cosine.item(), rel=1e-4, abs=1e-12)
        assert rows[name]["k"] == k
        assert rows[name]["subspace_similarity"] == pytest.approx((u1.T @ u2).pow(2).sum().item() / k, rel=1e-4)


def test_an_adapter_compared_with_itself_or_its_negative(tmp_path):
    write_adapter(tmp_path / "a", seed=0)
    same = compare_adapters(tmp_path / "a", tmp_path / "a")["modules"]
    assert all(m["cosine"] == pytest.approx(1) and m["subspace_similarity"] == pytest.approx(1) for m in same)
    write_adapter(tmp_path / "neg", seed=0, alpha=-8.0)
    neg = compare_adapters(tmp_path / "a", tmp_path / "neg")["modules"]
    assert all(m["cosine"] == pytest.approx(-1) and m["subspace_similarity"] == pytest.approx(1) for m in neg)


def test_relative_norm_uses_the_dequantized_base_weight(tiny_model_dir, tmp_path):
    path = tiny_model_dir("phi3")
    model = minilora.load_base(path, quant="nf4")
    minilora.add_lora(model, r=4, alpha=8, targets=["o_proj"])
    with torch.no_grad():
        for layer in minilora.lora_layers(model).values():
            layer.lora_B.normal_()
    minilora.save_adapter(model, tmp_path / "ad", path)
    report = inspect(tmp_path / "ad", model=path)
    for row in report["modules"]:
        layer = minilora.lora_layers(model)[row["name"]]
        base = dequantize_weight(layer.base_layer).double().norm().item()
        assert row["base_fro"] == pytest.approx(base, rel=1e-6)
        assert row["relative_norm"] == pytest.approx(layer.delta_weight().double().norm().item() / base, rel=1e-4)


def test_cli_writes_json_table_and_heatmap(tmp_path, capsys):
    write_adapter(tmp_path / "a", seed=0)
    write_adapter(tmp_path / "b", seed=1)
    code = run_cli(main, [str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--json", str(tmp_path / "r.json"),
                          "--plot", str(tmp_path / "r.png")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"modules", "compare"}
    assert set(report["modules"][0]) >= {"name", "rank", "delta_fro", "singular_values", "effective_rank",
                                         "stable_rank"}
    assert set(report["compare"]["modules"][0]) >= {"name", "cosine", "subspace_similarity"}
    assert not report["modules"][0]["name"].startswith("base_model.model.")
    table = capsys.readouterr().out.splitlines()
    norms = [float(line.split()[2]) for line in table[1:1 + len(SHAPES)]]
    assert norms == sorted(norms, reverse=True)  # what moved most first
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["missing", "not-an-adapter", "mismatched"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    write_adapter(tmp_path / "a", seed=0)
    if case == "missing":
        argv = [str(tmp_path / "nope")]
    elif case == "not-an-adapter":
        (tmp_path / "empty").mkdir()
        argv = [str(tmp_path / "empty")]
    else:
        write_adapter(tmp_path / "b", seed=0, shapes={"model.layers.0.mlp.down_proj": (16, 40)})
        argv = [str(tmp_path / "a"), "--compare", str(tmp_path / "b")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_dora_adapter_reports_its_direction_update_and_magnitudes(tiny_model_dir, tmp_path):
    path = tiny_model_dir("phi3")
    model = minilora.load_base(path, quant="nf4")
    minilora.add_lora(model, r=4, alpha=8, targets=["o_proj"], use_dora=True)
    with torch.no_grad():
        for layer in minilora.lora_layers(model).values():
            layer.lora_B.normal_()
    minilora.save_adapter(model, tmp_path / "ad", path)
    report = inspect(tmp_path / "ad")
    assert report["config"]["use_dora"] is True
    for row in report["modules"]:
        layer = minilora.lora_layers(model)[row["name"]]
        assert row["delta_fro"] == pytest.approx(layer.delta_weight().double().norm().item(), rel=1e-4)
        m = layer.lora_magnitude_vector.double()
        assert row["magnitude_vector"] == {"mean": pytest.approx(m.mean().item()), "std": pytest.approx(m.std().item())}
