"""Write a tiny random-weight Qwen3-MoE checkpoint with the real Qwen3 tokenizer, for `make demo`.

The weights are random, so whatever the model writes is noise: the checkpoint exists to run the whole
pipeline (convert, summarise, generate) offline. It is built by the same code as the tests' checkpoints
(tests/checkpoints.py, through transformers), which needs the dev extra: `make install` has it.

    python scripts/make_tiny_checkpoint.py demo/tiny-qwen3-moe --max-position-embeddings 1024 --force

Like `qwenmlx convert`, it writes into a hidden sibling renamed at the end, and --force replaces only a
directory qwenmlx wrote (its own earlier output), never anything else.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.checkpoints

from qwenmlx.destinations import new_directory, prepare_directory  # noqa: E402
from qwenmlx.errors import QwenMLXError  # noqa: E402
from tests.checkpoints import TINY_MOE, write_hf_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst", type=Path, help="Directory to write (created).")
    parser.add_argument("--max-position-embeddings", type=int, default=TINY_MOE["max_position_embeddings"],
                        help="The model's native window; small values make YaRN and map-reduce show up sooner.")
    parser.add_argument("--force", action="store_true", help="Replace DST if qwenmlx wrote it (an earlier run).")
    args = parser.parse_args()
    try:
        target = prepare_directory(args.dst, force=args.force, on_note=lambda message: print(f"note: {message}"))
    except QwenMLXError as e:
        sys.exit(f"error: {e}")
    with new_directory(target) as tmp:
        write_hf_checkpoint(tmp, dict(TINY_MOE, max_position_embeddings=args.max_position_embeddings))
    print(f"wrote a tiny random-weight Qwen3-MoE checkpoint to {args.dst}")


if __name__ == "__main__":
    main()
