"""A run's identity covers the content of what it depends on: `--resume` after the base model's files or
the data file changed under the same names is refused, saying what changed and how to start afresh."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_utils import DEMO, argv_for

from minilora.builtin import resolve_builtin
from minilora.model_files import describe_changes, model_file_digests
from minilora.training.cli import run

STEPS = ("--max-steps=2", "--save-every=1", "--eval-every=0")


def _scale_weights(folder):
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_template(folder):
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|end|>", "<|end|> "))


def _edit_tokenizer_config(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _add_file(folder):
    (folder / "special_tokens_map.json").write_text('{"pad_token": "<|endoftext|>"}')


CHANGES = {"weights scaled": (_scale_weights, "model.safetensors changed"),
           "chat template edited": (_edit_template, "chat_template.jinja changed"),
           "tokenizer config edited": (_edit_tokenizer_config, "tokenizer_config.json changed"),
           "a tokenizer file added": (_add_file, "special_tokens_map.json added")}


@pytest.fixture(scope="module")
def trained_on_a_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    model = root / "model"
    shutil.copytree(resolve_builtin("tiny-phi3"), model)
    out = root / "out"
    assert run(argv_for(out, DEMO, "--model", str(model), *STEPS)) == 0
    return root


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_resume_on_a_changed_base_is_refused_naming_the_file(trained_on_a_folder, tmp_path, capsys, change):
    edit, fragment = CHANGES[change]
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(trained_on_a_folder / "model", model)
    shutil.copytree(trained_on_a_folder / "out", out)
    edit(model)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert run(argv_for(out, DEMO, "--model", str(model), *STEPS, "--max-steps=4", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --resume: ") and "the files of the base model changed" in err, err
    assert fragment in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.slow
def test_resume_on_the_unchanged_base_in_another_folder_continues(trained_on_a_folder, tmp_path):
    """Identity is content, not a path: the same files elsewhere are the same base (`--model` must still match)."""
    out = tmp_path / "out"
    shutil.copytree(trained_on_a_folder / "out", out)
    model = trained_on_a_folder / "model"
    assert run(argv_for(out, DEMO, "--model", str(model), *STEPS, "--max-steps=3", "--resume")) == 0
    assert torch.isfinite(load_file(out / "adapter_model.safetensors")["base_model.model.model.layers.0.mlp."
                                                                         "down_proj.lora_A.weight"]).all()


@pytest.mark.slow
def test_resume_on_a_changed_data_file_is_refused(tmp_path, capsys):
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    data.write_text("\n".join(DEMO.read_text().splitlines()[:60]) + "\n")
    assert run(argv_for(out, data, *STEPS)) == 0
    data.write_text("\n".join(DEMO.read_text().splitlines()[1:61]) + "\n")  # same name, same size class
    capsys.readouterr()
    assert run(argv_for(out, data, *STEPS, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data_sha256: the data file's content changed" in err and "--overwrite" in err


def test_digests_name_the_files_transformers_reads_and_changes_are_named(tmp_path):
    shutil.copytree(resolve_builtin("tiny-phi3"), tmp_path / "m")
    (tmp_path / "m" / "README.md").write_text("a card")  # does not change the model
    before = model_file_digests(str(tmp_path / "m"))
    assert set(before) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                           "tokenizer_config.json", "chat_template.jinja"}
    _edit_template(tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").unlink()
    after = model_file_digests(str(tmp_path / "m"))
    assert describe_changes(before, after) == "chat_template.jinja changed, generation_config.json removed"
    assert model_file_digests("no-such-org/no-such-model-for-minilora") is None
