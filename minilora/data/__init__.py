"""Training data: JSONL records -> tokenized examples with loss masks -> batches."""
