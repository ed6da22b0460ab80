"""One check of a loaded adapter (types, ranges, finiteness of config and weights), and every reader uses
it: generate, merge and inspect each end a bad adapter with one `error:` line naming the file, exit 2,
before writing anything."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora import generate, inspect, merge
from minilora.adapter_check import check_adapter_config

BASE_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"],
               "lora_dropout": 0.05, "base_model_name_or_path": "builtin:tiny-phi3"}

# (what is written into adapter_config.json as raw JSON text for the key, what the error says)
BAD_CONFIG = {
    "alpha NaN": ("lora_alpha", "NaN", "'lora_alpha' must be a finite number"),
    "alpha -Infinity": ("lora_alpha", "-Infinity", "'lora_alpha' must be a finite number"),
    "alpha 1e300": ("lora_alpha", "1e300", "'lora_alpha' must be a finite number in [-1e+06, 1e+06]"),
    "alpha a string": ("lora_alpha", '"16"', "'lora_alpha' must be a finite number"),
    "dropout null": ("lora_dropout", "null", "'lora_dropout' must be a number in [0, 1)"),
    "dropout 1.5": ("lora_dropout", "1.5", "'lora_dropout' must be a number in [0, 1)"),
    "dropout NaN": ("lora_dropout", "NaN", "'lora_dropout' must be a number in [0, 1)"),
    "bad regex": ("target_modules", '"(qkv_proj"', "'target_modules' is not a valid regex"),
    "targets with a number": ("target_modules", '["qkv_proj", 5]', "'target_modules' must be a list"),
    "numeric base": ("base_model_name_or_path", "12345", "'base_model_name_or_path' must be a model name"),
    "r 1e30": ("r", "1e30", "'r' must be an integer in [1, 65536], got 1e+30"),
    "r 2**40": ("r", str(2**40), "'r' must be an integer in [1, 65536]"),
    "r 0": ("r", "0", "'r' must be an integer in [1, 65536], got 0"),
    "r true": ("r", "true", "'r' must be an integer"),
    "r 5000 digits": ("r", "9" * 5000, "not valid JSON"),
    "fan_in_fan_out": ("fan_in_fan_out", "true", "fan_in_fan_out adapters"),
}


def _write_adapter(folder, tensors_change=None):
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model, r=4, alpha=8, targets=["qkv_proj"])
    with torch.no_grad():
        for p in minilora.lora_parameters(model):
            p.normal_(0, 0.02)
    minilora.save_adapter(model, folder, "builtin:tiny-phi3")
    if tensors_change:
        tensors = load_file(folder / "adapter_model.safetensors")
        tensors_change(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    return _write_adapter(tmp_path_factory.mktemp("adapter") / "a")


def _with_raw(good, folder, key, raw):
    import shutil

    shutil.copytree(good, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config[key] = "__RAW__"
    (folder / "adapter_config.json").write_text(json.dumps(config).replace('"__RAW__"', raw))
    return folder


COMMANDS = {
    "generate": lambda a, out: (generate.main, ["--adapter", str(a), "--prompt", "hi", "--max-new-tokens", "2"]),
    "merge": lambda a, out: (merge.main, ["--adapter", str(a), "--output", str(out)]),
    "inspect": lambda a, out: (inspect.main, [str(a)]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIG))
def test_a_bad_adapter_config_is_one_line_in_every_command(good_adapter, tmp_path, run_command, case):
    key, raw, fragment = BAD_CONFIG[case]
    adapter = _with_raw(good_adapter, tmp_path / "bad", key, raw)
    for name, command in COMMANDS.items():
        main, argv = command(adapter, tmp_path / f"merged-{name}")
        code, _, err = run_command(main, argv)
        assert code == 2, (name, err)
        assert err.startswith(f"error: {adapter / 'adapter_config.json'}: ") and fragment in err, (name, err)
        assert err.count("\n") == 1 and len(err) < 400, err
        assert not (tmp_path / f"merged-{name}").exists()


NAN_KEY = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight"
BAD_WEIGHTS = {
    "a NaN": lambda t: t[NAN_KEY].view(-1)[3:5].fill_(float("nan")),
    "an inf": lambda t: t[NAN_KEY].view(-1)[0:1].fill_(float("inf")),
    "integer weights": lambda t: t.update({NAN_KEY: t[NAN_KEY].to(torch.int32)}),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_non_finite_or_integer_adapter_weights_are_one_line_in_every_command(tmp_path, run_command, case):
    adapter = _write_adapter(tmp_path / "bad", BAD_WEIGHTS[case])
    for name, command in COMMANDS.items():
        main, argv = command(adapter, tmp_path / f"merged-{name}")
        code, _, err = run_command(main, argv)
        assert code == 2, (name, err)
        assert err.startswith(f"error: {adapter / 'adapter_model.safetensors'}: '{NAN_KEY}' holds "), (name, err)
        assert not (tmp_path / f"merged-{name}").exists()


def test_the_good_adapter_passes_the_check_and_negative_alpha_is_allowed(good_adapter):
    config = json.loads((good_adapter / "adapter_config.json").read_text())
    assert check_adapter_config(config, "x") is config
    assert check_adapter_config({**BASE_CONFIG, "lora_alpha": -8}, "x")["lora_alpha"] == -8
    assert check_adapter_config({**BASE_CONFIG, "target_modules": ".*qkv_proj"}, "x")["r"] == 4


def test_inspect_against_a_base_with_nan_weights_is_one_line(good_adapter, tmp_path, run_command):
    import shutil

    from minilora.builtin import resolve_builtin

    model = tmp_path / "model"
    shutil.copytree(resolve_builtin("tiny-phi3"), model)
    weights = load_file(model / "model.safetensors")
    key = "model.layers.2.self_attn.qkv_proj.weight"
    weights[key][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_command(inspect.main, [str(good_adapter), "--model", str(model), "--json",
                                              str(tmp_path / "r.json")])
    assert code == 2 and err == f"error: --model {model}: the weight of model.layers.2.self_attn.qkv_proj holds " \
        "NaN or inf values\n"
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("body", ['{"config": []}', "[]", '{"config": {"quant": [1]}}', '{"config": null}'])
def test_a_run_json_of_the_wrong_shape_beside_an_adapter_means_the_defaults(tmp_path, body):
    from minilora.run_record import TrainedBase, read_trained_base

    (tmp_path / "run.json").write_text(body)
    assert read_trained_base(tmp_path) == TrainedBase()
