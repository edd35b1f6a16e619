"""End-to-end generation benchmark; the same as ``rotatekv bench`` (see rotatekv/bench.py).

    python benches/e2e.py --context 8192 --batch 1,8 --new-tokens 32 \\
        --memory-budget 6GiB --json bench-out/e2e.json --plots bench-out
"""

from rotatekv.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
