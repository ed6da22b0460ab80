"""A checkpoint folder from someone else runs no code: nothing in it is unpickled, whatever its manifest says."""

import json
import pickle
import random

import numpy as np
import pytest
import torch
from train_utils import DEMO, argv_for, run_quick

import minilora
from minilora.training.checkpoint import MANIFEST_NAME, SELF_KEY, _manifest_digest, _sha256, rng_states
from minilora.training.cli import run
from minilora.training.state_io import JSON_NAME, TENSORS_NAME, StateFormatError, load_state, save_state


class _Planted:
    """Unpickling this creates `marker`: the proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _reseal(folder):
    """A manifest that matches the folder's files as they are now (what an attacker would write)."""
    body = json.loads((folder / MANIFEST_NAME).read_text())
    body.pop(SELF_KEY)
    body["sha256"] = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.name != MANIFEST_NAME}
    (folder / MANIFEST_NAME).write_text(json.dumps({**body, SELF_KEY: _manifest_digest(body)}))


def test_state_round_trips_exactly_without_pickles(tmp_path):
    random.seed(3)
    np.random.seed(4)
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    optimizer = torch.optim.AdamW(minilora.lora_parameters(model), lr=1e-3)
    sum(p.sum() for p in minilora.lora_parameters(model)).backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "rng": rng_states(), "eval": {"ppl": float("inf")}, "step": 7}
    save_state(state, tmp_path)
    assert b"\x80" not in (tmp_path / JSON_NAME).read_bytes()[:2]  # JSON, not a pickle
    json.loads((tmp_path / JSON_NAME).read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    back = load_state(tmp_path)
    assert back["step"] == 7 and back["eval"]["ppl"] == float("inf")
    assert back["rng"]["python"] == state["rng"]["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["rng"]["numpy"], state["rng"]["numpy"], strict=True))
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    saved, loaded = state["optimizer"], back["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"] and loaded["state"].keys() == saved["state"].keys()
    for i, entry in saved["state"].items():
        assert all(torch.equal(entry[k], loaded["state"][i][k]) for k in entry)
    optimizer.load_state_dict(loaded)  # torch accepts it as it is


@pytest.mark.parametrize("body", ['{"dict": [[{"tensor": "9"}, 1]]}', '{"callable": "os.system"}', "[1, 2]",
                                  '{"float": "1e999"}', '{"ndarray": [1], "dtype": "object"}', "NaN"])
def test_a_state_that_is_not_ours_is_refused_by_name(tmp_path, body):
    save_state({"step": 1}, tmp_path)
    (tmp_path / JSON_NAME).write_text(body)
    with pytest.raises(StateFormatError, match=str(tmp_path / JSON_NAME)):
        load_state(tmp_path)


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert run_quick(out, max_steps=3, save_every=1, eval_every=0) == 0
    return out


def _copy(run_dir, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    return out


@pytest.mark.slow
def test_a_planted_pickle_with_a_correct_manifest_runs_nothing_on_resume(three_step_run, tmp_path, capsys):
    """An older-format checkpoint (training_state.pt) resealed with a correct manifest is passed over."""
    out, marker = _copy(three_step_run, tmp_path), tmp_path / "pwned"
    newest = out / "checkpoints" / "step-3"
    for name in (JSON_NAME, TENSORS_NAME):
        (newest / name).unlink()
    torch.save({"optimizer": _Planted(marker)}, newest / "training_state.pt")
    _reseal(newest)
    assert run(argv_for(out, DEMO, "--max-steps=3", "--save-every=1", "--eval-every=0", "--resume")) == 0
    printed = capsys.readouterr().out
    assert not marker.exists()
    assert "step-3: skipped, written by an older minilora" in printed and "step-2" in printed


@pytest.mark.slow
@pytest.mark.parametrize("name", [JSON_NAME, TENSORS_NAME])
def test_pickle_bytes_under_a_state_files_name_are_one_line_and_run_nothing(three_step_run, tmp_path, capsys, name):
    out, marker = _copy(three_step_run, tmp_path), tmp_path / "pwned"
    newest = out / "checkpoints" / "step-3"
    (newest / name).write_bytes(pickle.dumps({"optimizer": _Planted(marker)}))
    _reseal(newest)
    assert run(argv_for(out, DEMO, "--max-steps=3", "--save-every=1", "--eval-every=0", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert not marker.exists()
    assert err.startswith("error: --resume: ") and "not a training state minilora wrote" in err


def _bad_position(state):
    state["data_position"]["index"] = 10**9


def _bad_moment(state):
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"] = torch.zeros(3)


STATE_EDITS = {
    "negative step": (lambda s: s.update(step=-1), "step is -1, not a count"),
    "position past the epoch": (_bad_position, "past its epoch's batches"),
    "moment of the wrong shape": (_bad_moment, "exp_avg does not have its weight's shape"),
    "NaN evaluation": (lambda s: s.update(eval_before={"loss": float("nan"), "ppl": 1.0, "tokens": 3}), "eval_before"),
    "no RNG for this rank": (lambda s: s.update(rng_per_rank=[]), "IndexError"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_a_decodable_state_with_wrong_values_is_one_line(three_step_run, tmp_path, capsys, case):
    edit, fragment = STATE_EDITS[case]
    out = _copy(three_step_run, tmp_path)
    newest = out / "checkpoints" / "step-3"
    state = load_state(newest)
    edit(state)
    save_state(state, newest)
    _reseal(newest)
    assert run(argv_for(out, DEMO, "--max-steps=4", "--save-every=1", "--eval-every=0", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --resume: {newest}: the training state does not fit this run") and fragment in err
