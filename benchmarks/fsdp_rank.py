"""One torchrun rank of `python -m benchmarks.fsdp --run`: train.py as it is, then this process's peak resident
memory written to `<folder>/rank<RANK>.json`.

    torchrun --nproc-per-node N -m benchmarks.fsdp_rank FOLDER train.py --data ... [train.py's flags]

The peak is VmHWM, the kernel's high-water mark of the process's resident memory (imports, load, training and
saving, all of it), read after train.py returns or fails.
"""

import json
import os
import runpy
import sys
from pathlib import Path

from .load_memory import proc_status


def main() -> None:
    folder, script, *train_args = sys.argv[1:]
    sys.argv = [script, *train_args]
    rank = int(os.environ.get("RANK", "0"))
    try:
        runpy.run_path(script, run_name="__main__")  # train.py ends in sys.exit: the finally still runs
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss": proc_status("VmHWM")}))


if __name__ == "__main__":
    main()
