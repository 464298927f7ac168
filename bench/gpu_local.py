"""The whole GPU measurement of the local worker in one short command (SPEC §6: >= 8x at 16).

    python -m bench.gpu_local            # on a CUDA machine, from the repository root

Builds a random 1.1 B Llama (TinyLlama's shape, bf16, fixed seed) once, then measures with
`bench.local_tokens` on cuda:0: the real worker (a LocalProvider and its worker process: slot
cache, CUDA graphs per bucket) at 1, 16 and 64 continuous streams (prompt ~32 tokens, 128 new
tokens each, EOS never emitted; the N streams arrive spread over the first second, so they
join a running batch), the first-token time of a 1,024-token prefix served before vs cold,
and plain transformers on the same weights in the same run (`generate` at 1/16/64, static
cache + torch.compile at 1/16/64, `generate_batch` at 16/64). Writes the table with the card's
name to bench/results/gpu_local.md (and .json) and prints the SPEC §6 GPU checks (64 streams
>= 13,000 tok/s, batch 1 >= 400 tok/s, 16 streams >= 8x one). Sized to finish in under 8
minutes on an H200 (most of it is torch.compile).
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
        "--spread", "1.0", "--no-baseline", "--prefix", "1024", "--prefix-rounds", "2",
        "--hf", "--hf-ways", "generate,static_compile,generate_batch", "--hf-budget", "240",
        "--out", str(out), "--json", str(data),
    ])
    rows = json.loads(data.read_text(encoding="utf-8"))["rows"]
    engine = {r["streams"]: r["tokens_per_s"] for r in rows if r["way"] == "meshnode engine"}
    checks = [
        ("64 continuous streams >= 13,000 tok/s", engine[64] >= 13_000, f"{engine[64]:.0f}"),
        ("batch 1 >= 400 tok/s", engine[1] >= 400, f"{engine[1]:.0f}"),
        ("16 streams >= 8x one at a time", engine[16] >= 8 * engine[1],
         f"{engine[16] / engine[1]:.2f}x"),
    ]
    lines = ["", "SPEC §6 GPU checks:"] + [
        f"- {name}: {value} {'PASS' if ok else 'FAIL'}" for name, ok, value in checks]
    text = "\n".join(lines) + "\n"
    print(text)
    with out.open("a", encoding="utf-8") as f:
        f.write(text)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
