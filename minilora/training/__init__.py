"""The training job (`python train.py`): command line, settings, the loop and everything a run writes.

The library API (loading a 4-bit base, the LoRA layer, adapters) sits one level up in `minilora/`;
this subpackage is one user of it.
"""
