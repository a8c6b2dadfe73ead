"""What storing activations in half precision costs an SAE: held-out FVU per store dtype.

One harvest per dtype (`--store-dtype`) of the same model, corpus and tokens; the same TopK SAE
(same seed, steps and batches) trained on each; held-out FVU and L0 printed side by side with the
difference from float32 and the bytes per value.

    python benchmarks/store_dtype.py [--model minilm] [--hook blocks.3.hook_out] [--tokens 40000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.harvest import HarvestConfig, run_harvest  # noqa: E402
from activations.store import STORE_DTYPES, row_bytes  # noqa: E402
from sae.cli import plan_from_values, run_plan  # noqa: E402


def fvu_for(dtype: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    ws = folder / f"{dtype}.duckdb"
    run_harvest(
        HarvestConfig(
            model=args.model,
            hooks=(args.hook,),
            ctx_len=args.ctx_len,
            max_tokens=args.tokens,
            store_dtype=dtype,
        ),
        ws,
        progress=False,
    )
    final = run_plan(
        plan_from_values(
            {
                "workspace": str(ws),
                "hook": args.hook,
                "arch": "topk",
                "n_latents": args.n_latents,
                "k": args.k,
                "train_tokens": args.train_tokens,
                "batch_size": 1024,
                "seed": 0,
                "name": "fvu",
                "progress": False,
                "eval_tokens": 100_000,
            }
        )
    )
    return final


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--hook", default="blocks.3.hook_out")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--train-tokens", type=int, default=200_000)
    parser.add_argument("--n-latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", *(d for d in STORE_DTYPES if d != "float32")):
            rows[dtype] = fvu_for(dtype, args, Path(tmp))
    base = rows["float32"]["fvu"]
    print(
        f"\n{args.model} {args.hook}, {args.tokens} tokens harvested, TopK n={args.n_latents} k={args.k}, "
        f"{args.train_tokens} training tokens, held-out FVU\n"
    )
    print("| store dtype | bytes/value | held-out FVU | FVU - float32 | L0 |")
    print("|---|---|---|---|---|")
    for dtype, m in rows.items():
        print(
            f"| {dtype} | {row_bytes(1, dtype)} | {m['fvu']:.5f} | {m['fvu'] - base:+.5f} | {m.get('l0', float('nan')):.1f} |"
        )


if __name__ == "__main__":
    main()
