"""The whole pipeline on the built-in SmolLM2-135M-Instruct over the built-in `python-code` corpus.

Stages, each timed (tokens/s printed so a full run's duration can be estimated from a small one):
  1. load: find or make the dequantised cache folder, then boot it (first use converts the GGUF);
  2. speed: harvest tokens/s against the bare forward over the same batches (corpus reading,
     tokenising, batching and the forward to the last hook, no storage), in a scratch workspace;
  3. harvest: `--harvest-tokens` of python-code at `--hook` into `--workspace` (resumable: run the
     same command again after an interruption, the harvest and a finished run are reused);
  4. train: TopK (`--n-latents`, `--k`, `--lr`) on `--train-tokens` tokens of the harvest's train split;
  5. eval: held-out FVU, L0 and dead fraction over the whole eval split, then CE clean / SAE-spliced /
     zero-ablated, CE score, ΔCE and KL score with the model re-run on held-out windows until
     `--eval-targets` next-token targets are covered (the eval split is 5% of documents, so 2M
     harvested tokens hold about 100k);
  6. dead: the latents the SAE never fires on over the whole train split, the measure the <= 1% target
     is checked on (a held-out split of ~200k tokens cannot tell a latent firing once in 50k tokens
     from a dead one).

The issue-18 setting is the default (blocks.15.hook_out, n 16384, k 32, 2.2M harvested tokens, 20M
training tokens, 100k held-out targets); hours on 2 CPU cores. `--tiny` runs every stage on a few
thousand to a few hundred thousand tokens, with the same SAE shape, to check it end to end and read
the per-stage throughput.

    python benchmarks/smollm2.py --workspace bench-smollm2.duckdb            # the full measurement
    python benchmarks/smollm2.py --tiny --workspace /tmp/smollm2-tiny.duckdb
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harvest import bare_forward_s  # noqa: E402  (benchmarks/harvest.py)

TARGETS = {"delta_ce": ("<=", 0.10), "ce_score": (">=", 0.98), "dead_train_split": ("<=", 0.01)}
"""Issue 18's targets at L0 32."""


def _rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds:,.0f}" if seconds > 0 else "-"


def stage_load() -> tuple[Any, dict[str, float]]:
    from activations.models import load_model, smollm2_folder

    t0 = time.perf_counter()
    folder = smollm2_folder()
    t1 = time.perf_counter()
    model = load_model(str(folder))
    t2 = time.perf_counter()
    return model, {"folder_s": t1 - t0, "boot_s": t2 - t1}


def harvest_config(a: argparse.Namespace, tokens: int) -> Any:
    from activations.harvest import HarvestConfig

    return HarvestConfig(
        model="smollm2",
        corpus="python-code",
        hooks=(a.hook,),
        ctx_len=a.ctx_len,
        max_tokens=tokens,
        batch_size=a.harvest_batch,
    )


def stage_speed(a: argparse.Namespace) -> dict[str, float]:
    """Harvest and bare forward over the same first `--speed-tokens` of python-code, in a scratch workspace:
    bare, harvest, bare again (the mean of the two bare passes, so warm-up and drifting load favour neither)."""
    from activations.harvest import Harvester

    with tempfile.TemporaryDirectory() as tmp:
        harvester = Harvester(harvest_config(a, a.speed_tokens), Path(tmp) / "speed.duckdb")
        bare = [bare_forward_s(harvester)]
        stats = harvester.run(progress=False)
        bare.append(bare_forward_s(harvester))
    return {
        "tokens": stats.tokens,
        "bare_s": sum(bare) / 2,
        "bare_runs_s": bare,
        "harvest_s": stats.wall_s,
        "forward_s": stats.forward_s,
    }


def stage_harvest(a: argparse.Namespace) -> dict[str, float]:
    """The harvest into the workspace; after an interruption, only the tokens added by this call are timed."""
    from activations.harvest import Harvester

    harvester = Harvester(harvest_config(a, a.harvest_tokens), a.workspace)
    stats = harvester.run(progress=True)
    return {"tokens": harvester.info.n_tokens, "new_tokens": stats.tokens, "wall_s": stats.wall_s}


def stage_train(ws: Path, a: argparse.Namespace) -> dict[str, Any]:
    from sae import runs
    from sae.cli import plan_from_values, run_plan
    from saewb.workspace import Workspace

    done = {r["name"]: r for r in runs.list_runs(Workspace(ws))}
    if done.get(a.name, {}).get("status") == "done":
        return {"tokens": a.train_tokens, "wall_s": float("nan"), "reused": True}
    plan = plan_from_values(
        {
            "workspace": str(ws),
            "hook": a.hook,
            "arch": "topk",
            "n_latents": a.n_latents,
            "k": a.k,
            "train_tokens": a.train_tokens,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "decoder": a.decoder,
            "seed": 0,
            "name": a.name,
            "progress": True,
        }
    )
    t0 = time.perf_counter()
    run_plan(plan)
    return {"tokens": a.train_tokens, "wall_s": time.perf_counter() - t0, "reused": False}


def stage_eval(ws: Path, model: Any, a: argparse.Namespace) -> dict[str, Any]:
    from analysis.evaluate import evaluate_run

    t0 = time.perf_counter()
    metrics = evaluate_run(
        ws,
        a.name,
        model=model,
        targets=a.eval_targets,
        batch_size=8,
        documents=a.documents,
        random_error=a.random_error,
    )
    metrics["wall_s"] = time.perf_counter() - t0
    return metrics


def stage_dead(ws: Path, a: argparse.Namespace) -> dict[str, float]:
    """The fraction of latents that fire on no typical token of the whole train split."""
    import sae
    from activations.stream import ActivationStream
    from sae.lifecycle import split_dead_fraction

    t0 = time.perf_counter()
    model = sae.load(a.name, workspace=ws)
    stream = ActivationStream(ws, a.hook, batch_size=8192, split="train")
    return {**split_dead_fraction(model, stream), "wall_s": time.perf_counter() - t0}


def split_tokens(ws: Path, hook: str) -> dict[str, int]:
    """Non-special tokens in the train and eval splits of the harvest (what the trainer and eval read)."""
    from activations.stream import ActivationStream

    return {
        split: ActivationStream(ws, hook, batch_size=4096, split=split).n_tokens
        for split in ("train", "eval")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=Path("bench-smollm2.duckdb"))
    p.add_argument("--hook", default="blocks.15.hook_out")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--harvest-tokens", type=int, default=2_200_000)
    p.add_argument(
        "--speed-tokens", type=int, default=20_000, help="tokens of the harvest-vs-bare-forward pass"
    )
    p.add_argument("--harvest-batch", type=int, default=16, help="windows per forward pass")
    p.add_argument("--n-latents", type=int, default=16_384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: the trainer's rule, sae.configs.default_lr)",
    )
    p.add_argument(
        "--decoder", choices=["free", "unit"], default=None, help="TopK decoder mode (default: the trainer's)"
    )
    p.add_argument("--train-tokens", type=int, default=20_000_000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--eval-targets", type=int, default=100_000, help="held-out next-token targets for CE/KL")
    p.add_argument(
        "--documents", type=int, default=10, help="list the held-out documents the splice costs most"
    )
    p.add_argument(
        "--random-error",
        action="store_true",
        help="also ΔCE of random errors of the SAE's size (one forward)",
    )
    p.add_argument("--name", default="smollm2-topk")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="small token counts, same SAE shape: an end-to-end check and per-stage rates",
    )
    speed_stage = p.add_mutually_exclusive_group()
    speed_stage.add_argument(
        "--speed-only", action="store_true", help="load and harvest-vs-bare-forward only"
    )
    speed_stage.add_argument(
        "--skip-speed", action="store_true", help="skip the harvest-vs-bare-forward stage"
    )
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    a = p.parse_args()
    if a.tiny:  # token counts only: the SAE's shape stays, so the train rate is the full run's
        a.harvest_tokens, a.speed_tokens, a.train_tokens, a.eval_targets = 40_000, 4_096, 200_000, 1_500

    model, load = stage_load()
    speed = None if a.skip_speed else stage_speed(a)
    if speed is not None and a.speed_only:
        print(
            f"\nSmolLM2-135M-Instruct {a.hook}, python-code, ctx {a.ctx_len}, batch {a.harvest_batch} windows"
        )
        print(
            f"bare forward passes: {', '.join(f'{s:.1f} s' for s in speed['bare_runs_s'])}; "
            f"harvest {speed['harvest_s']:.1f} s (forward {speed['forward_s']:.1f} s of it) for {speed['tokens']:,} tokens: "
            f"{_rate(speed['tokens'], speed['bare_s'])} vs {_rate(speed['tokens'], speed['harvest_s'])} tokens/s, "
            f"harvest x{speed['bare_s'] / speed['harvest_s']:.2f} of bare"
        )
        return
    harvest = stage_harvest(a)
    splits = split_tokens(a.workspace, a.hook)
    train = stage_train(a.workspace, a)
    ev = stage_eval(a.workspace, model, a)
    dead = stage_dead(a.workspace, a)
    ev["dead_train_split"] = dead["dead_train_split"]

    print(
        f"\nSmolLM2-135M-Instruct {a.hook}, python-code, ctx {a.ctx_len}; TopK n {a.n_latents}, k {a.k}, "
        f"lr {a.lr if a.lr is not None else 'default rule'}, batch {a.batch_size}\n"
    )
    print("| stage | tokens | seconds | tokens/s |")
    print("|---|---|---|---|")
    print(f"| find cache folder (hash the GGUF; converts on first use) | | {load['folder_s']:.1f} | |")
    print(f"| boot the cached folder (TransformerBridge) | | {load['boot_s']:.1f} | |")
    if speed is not None:
        print(
            f"| bare forward to {a.hook} (read, tokenise, batch, forward) | {speed['tokens']:,} | "
            f"{speed['bare_s']:.1f} | {_rate(speed['tokens'], speed['bare_s'])} |"
        )
        print(
            f"| harvest, same batches | {speed['tokens']:,} | {speed['harvest_s']:.1f} | "
            f"{_rate(speed['tokens'], speed['harvest_s'])} (x{speed['bare_s'] / speed['harvest_s']:.2f} of bare) |"
        )
    print(
        f"| harvest into the workspace ({harvest['tokens']:,} tokens in all; this call's) | "
        f"{harvest['new_tokens']:,} | {harvest['wall_s']:.1f} | {_rate(harvest['new_tokens'], harvest['wall_s'])} |"
    )
    epochs = a.train_tokens / max(splits["train"], 1)
    reused = " (reused, not timed)" if train["reused"] else ""
    print(
        f"| train TopK ({epochs:.1f} epochs of {splits['train']:,} train tokens){reused} | {a.train_tokens:,} | "
        f"{train['wall_s']:.1f} | {_rate(a.train_tokens, train['wall_s'])} |"
    )
    targets = int(ev["lm_targets"])
    forwards = 4 if a.random_error else 3
    print(
        f"| eval: reconstruction on {int(ev['eval_tokens']):,} held-out tokens + {forwards} full forwards over "
        f"{int(ev['lm_windows'])} windows | {targets:,} | {ev['wall_s']:.1f} | "
        f"{_rate(forwards * targets, ev['wall_s'])} "
        "(forward tokens) |"
    )
    print(f"| dead: the SAE over the whole train split | {splits['train']:,} | {dead['wall_s']:.1f} | |")

    print("\n| metric (held out, but the train-split row) | value | target |")
    print("|---|---|---|")
    for key, label in (
        ("fvu", "FVU"),
        ("l0", "L0"),
        ("dead_frac", "never firing on the held-out split"),
        ("dead_train_split", "dead: never firing over the whole train split"),
        ("ce_clean", "CE clean"),
        ("ce_sae", "CE with SAE spliced in"),
        ("ce_zero", "CE zero-ablated"),
        ("ce_score", "CE score"),
        ("delta_ce", "ΔCE (nats)"),
        ("kl_sae", "KL(clean ‖ spliced)"),
        ("kl_score", "KL score"),
        ("delta_ce_rand", "ΔCE of random errors of the SAE's size"),
        ("error_pathology", "ΔCE / random ΔCE"),
    ):
        if key not in ev:
            continue
        goal = ""
        if key in TARGETS:
            op, bound = TARGETS[key]
            met = ev[key] <= bound if op == "<=" else ev[key] >= bound
            goal = f"{op} {bound} ({'met' if met else 'missed'})"
        print(f"| {label} | {ev[key]:.4f} | {goal} |")
    print(f"| next-token targets for CE/KL | {targets:,} | >= {a.eval_targets:,} |")
    if targets < a.eval_targets:
        print(f"\nonly {targets:,} held-out targets: harvest more tokens (about 20x the targets wanted)")
    if ev.get("documents"):
        from analysis.evaluate import format_documents

        print(f"\nthe {len(ev['documents'])} held-out documents the splice costs most:\n")
        print(format_documents(ev["documents"]))
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "load": load,
                    "speed": speed,
                    "harvest": harvest,
                    "splits": splits,
                    "train": train,
                    "eval": ev,
                    "dead": dead,
                    "args": {k: str(v) for k, v in vars(a).items()},
                },
                indent=1,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
