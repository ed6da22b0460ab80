"""Helpers shared by the LoRA tests."""

import torch

import minilora
from benchmarks.harness import draw_masks_as_minilora  # noqa: F401  (the tests compare with PEFT through it)

# Same fp32 math in a different association order (PEFT's nn.Linear modules vs our F.linear on
# the same tensors): results agree to float32 rounding.
ATOL, RTOL = 1e-5, 1e-4


def tokens(seed=0, shape=(2, 12), vocab=160):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed=1, std=0.1):
    """Non-zero B, so the adapter changes the output (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in minilora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def save_random_adapter(base_dir, folder, quant="nf4", targets=None):
    """A LoRA model on `base_dir` with non-zero B saved to `folder`: (folder, its logits on `tokens()`)."""
    model = minilora.load_base(base_dir, quant=quant)
    minilora.add_lora(model, r=8, alpha=16, dropout=0.05, targets=targets)
    randomize_lora(model)
    model.eval()
    with torch.no_grad():
        logits = model(tokens()).logits
    minilora.save_adapter(model, folder, base_dir)
    return folder, logits

