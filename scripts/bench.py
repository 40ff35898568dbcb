"""qwenmlx against mlx-lm on synthetic Qwen3-30B-A3B-shaped checkpoints: `qwenmlx bench` (see qwenmlx/bench.py).

    python scripts/bench.py --quick              # a few minutes
    python scripts/bench.py --layers 2           # the issue's sizes: 512-token prompt, 128 decoded, 4/6-bit
    python scripts/bench.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenmlx.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
