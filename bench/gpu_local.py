"""The whole GPU measurement of the local worker in one short command (SPEC §6: >= 8x at 16).

    python -m bench.gpu_local            # on a CUDA machine, from the repository root

Builds a random 1.1 B Llama (TinyLlama's shape, bf16, fixed seed) once, then measures with
`bench.local_tokens` on cuda:0: the worker engine at 1, 16 and 64 concurrent streams (prompt
~32 tokens, 128 new tokens each, EOS never emitted), and plain transformers on the same
weights (`generate` at 1/16/64, `generate_batch` at 16/64). Writes the table with the card's
name to bench/results/gpu_local.md (and .json) and prints the SPEC check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import local_tokens  # noqa: E402


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: run this on a GPU machine", file=sys.stderr)
        return 2
    out = ROOT / "bench" / "results" / "gpu_local.md"
    data = ROOT / "bench" / "results" / "gpu_local.json"
    local_tokens.main([
        "--device", "cuda:0", "--model", "llama-1b", "--streams", "1", "16", "64",
        "--tokens", "128", "--single-requests", "2", "--rounds", "1", "--threads", "0",
        "--hf", "--out", str(out), "--json", str(data),
    ])
    rows = json.loads(data.read_text(encoding="utf-8"))["rows"]
    engine = {r["streams"]: r["tokens_per_s"] for r in rows if r["way"] == "meshnode engine"}
    ratio16 = engine[16] / engine[1]
    verdict = "PASS" if ratio16 >= 8 else "FAIL"
    line = (f"\nSPEC §6 (GPU, 16 streams >= 8x one at a time): {ratio16:.2f}x {verdict}; "
            f"64 streams: {engine[64] / engine[1]:.2f}x\n")
    print(line)
    with out.open("a", encoding="utf-8") as f:
        f.write(line)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
