"""Training data: JSONL records -> tokenized examples with loss masks in a cached, memory-mapped store -> batches.

    records.py   read and validate the file line by line (formats, `file:line` errors)
    tokenize.py  render and tokenize records with the trained-token mask
    byte_tiling.py  token positions from the tokens' bytes (byte-level BPE), without the offsets' cost
    prepare.py   stream a file through worker processes into a store
    store.py     the store: flat token ids, mask bits and offsets on disk, memory-mapped
    cache.py     where stores live, their keys, atomic publication and checks
    dataset.py   `load_dataset` (the entry point) and the held-out split
    examples.py  the shared vocabulary: IGNORE_INDEX, Example, Examples, count_targets, seeded_permutation
    batching.py  epoch order and collation into padded or packed batches
"""
