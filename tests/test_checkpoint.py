"""Checkpoint integrity: every file and the manifest itself carry checksums; a damaged checkpoint is
skipped for the previous one, with a note saying why."""

import pytest
import torch

import minilora
from minilora.training.checkpoint import newest_intact_checkpoint, save_checkpoint

DAMAGE = {
    "a changed value": (lambda text: text.replace('"r": 8', '"r": 16'), "does not match its own checksum"),
    "truncated": (lambda text: text[: len(text) // 2], "unreadable manifest"),
    "not an object": (lambda text: "null", "unreadable manifest"),
    "nested too deeply": (lambda text: "[" * 100_000 + "]" * 100_000, "unreadable manifest"),
    "checksum removed": (lambda text: text.replace('"manifest_sha256"', '"other"'), "unreadable manifest"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_manifest_makes_its_checkpoint_skipped(tmp_path, damage):
    change, why = DAMAGE[damage]
    model = minilora.load_base("builtin:tiny-phi3")
    minilora.add_lora(model)
    optimizer = torch.optim.AdamW(minilora.lora_parameters(model))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, optimizer, scaler, {}, {"r": 8}, keep=3)
    assert newest_intact_checkpoint(tmp_path)[0].name == "step-2"
    manifest = tmp_path / "checkpoints" / "step-2" / "manifest.json"
    manifest.write_text(change(manifest.read_text()))
    folder, notes = newest_intact_checkpoint(tmp_path)
    assert folder.name == "step-1"
    assert notes[-1].startswith(f"{manifest.parent}: skipped, ") and why in notes[-1], notes
