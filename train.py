#!/usr/bin/env python
"""Fine-tune a LoRA adapter on a 4-bit base model: `python train.py --data my.jsonl` (see --help)."""

from minilora.training.cli import main

if __name__ == "__main__":
    main()
