"""`saewb eval`, `saewb intervene` and `saewb probe`.

saewb eval my-run --workspace ws.duckdb
saewb intervene my-run --workspace ws.duckdb --prompt "def f(x):" --ablate 3,17 --generate 20
saewb intervene my-run --workspace ws.duckdb --prompt "a cat" --steer 12=4.0 --candidate "a dog" --candidate "tax law"
saewb probe my-run --workspace ws.duckdb --data labelled.csv
"""

from __future__ import annotations

import argparse
import json


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated latent ids like 3,17, got {text!r}"
        ) from err


def _pairs(text: str) -> tuple[tuple[int, ...], float]:
    """'3,17=2.5' -> ((3, 17), 2.5)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected LATENTS=VALUE like 3,17=2.5, got {text!r}")
    lhs, rhs = text.rsplit("=", 1)
    try:
        return _ids(lhs), float(rhs)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LATENTS=VALUE like 3,17=2.5, got {text!r}") from err


def _ks(text: str) -> tuple[int, ...]:
    return _ids(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained SAE run on held-out documents",
        description="Reconstruction metrics on the harvest's held-out activations, then CE/KL "
        "(causal LMs) or embedding cosine / top-10 neighbour overlap (encoders) with the SAE "
        "spliced into the model. Stored in the workspace's evals table.",
    )
    p.add_argument(
        "run",
        nargs="+",
        help="run name (see `saewb runs`); several runs of one hook are compared on the same held-out "
        "tokens, with ΔCE against the first and its 95%% interval",
    )
    p.add_argument("--workspace", required=True)
    p.add_argument(
        "--model", help="model to load instead of the one the harvest recorded (e.g. a moved folder)"
    )
    p.add_argument("--max-seqs", type=int, default=64, help="held-out windows re-run through the model")
    p.add_argument(
        "--targets",
        type=int,
        metavar="N",
        help="instead of --max-seqs: as few held-out windows as hold N next-token targets (CE/KL), spread "
        "evenly over the held-out split",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--no-downstream", action="store_true", help="reconstruction metrics only (no model run)")
    p.add_argument(
        "--random-error",
        action="store_true",
        help="causal LMs: also splice an error of the SAE's size in a random direction (one more forward "
        "per run): delta_ce_rand and error_pathology = delta_ce / delta_ce_rand",
    )
    p.add_argument(
        "--documents",
        type=int,
        default=0,
        metavar="N",
        help="causal LMs: list the N held-out documents the splice costs most, with their share of the "
        "excess loss (where ΔCE comes from)",
    )
    p.add_argument(
        "--dead-over-train",
        action="store_true",
        help="also count the latents that fire on no token of the whole train split (dead_train_split): "
        "a held-out split is too short to tell a rare latent from a dead one; one more pass, over the "
        "train split",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or lines")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "intervene",
        help="edit SAE latents on a prompt and compare with the clean model",
        description="One hooked forward pass: ablate, clamp or scale latents (with the error term "
        "by default), or add coeff·W_dec[i]. Causal LMs: top-k next tokens, per-token logit "
        "differences and generations. Encoders: similarity to --candidate texts.",
    )
    p.add_argument("run")
    p.add_argument("--workspace", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--model")
    p.add_argument("--hook", help="must be the hook the SAE was trained on (default: that hook)")
    p.add_argument("--ablate", type=_ids, action="append", default=[], metavar="IDS", help="e.g. 3,17")
    p.add_argument("--clamp", type=_pairs, action="append", default=[], metavar="IDS=V", help="e.g. 3=5.0")
    p.add_argument("--scale", type=_pairs, action="append", default=[], metavar="IDS=V", help="e.g. 3,17=2")
    p.add_argument(
        "--steer",
        type=_pairs,
        action="append",
        default=[],
        metavar="ID=COEFF",
        help="add COEFF·W_dec[ID] at the hook, e.g. 12=4.0",
    )
    p.add_argument("--no-error-term", action="store_true", help="replace x by the (edited) reconstruction")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="tokens to generate, clean and edited"
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy (seeded by --seed)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidate", action="append", default=[], help="encoders: a candidate text (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_intervene)

    p = sub.add_parser(
        "probe",
        help="k-sparse probing on SAE latents vs raw model dimensions",
        description="Labelled texts (CSV with header text,label, or JSONL) -> test accuracy and "
        "F1 of L2 logistic probes on the top-k features for each k.",
    )
    p.add_argument("run")
    p.add_argument("--workspace", required=True)
    p.add_argument("--data", required=True, help="CSV (text,label) or JSONL with two label values")
    p.add_argument("--model")
    p.add_argument("--ks", type=_ks, default=(1, 2, 5, 10, 20), help="comma-separated k values")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l2", type=float, default=1.0, help="L2 strength of the logistic regression")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_probe)


def _eval(args: argparse.Namespace) -> int:
    from analysis.evaluate import evaluate_runs, format_comparison, format_table

    outs = evaluate_runs(
        args.workspace,
        args.run,
        model_name=args.model,
        max_seqs=args.max_seqs,
        targets=args.targets,
        batch_size=args.batch_size,
        downstream=not args.no_downstream,
        random_error=args.random_error,
        documents=args.documents,
        dead_over_train=args.dead_over_train,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(outs[0] if len(outs) == 1 else outs, indent=2))
    else:
        print(format_table(outs[0]) if len(outs) == 1 else format_comparison(outs))
    return 0


def _intervene(args: argparse.Namespace) -> int:
    from analysis.interventions import LMResult, format_lm_result, format_search, intervene_run

    r = intervene_run(
        args.workspace,
        args.run,
        args.prompt,
        ablate=args.ablate,
        clamp=args.clamp,
        scale=args.scale,
        steer=args.steer,
        error_term=not args.no_error_term,
        model_name=args.model,
        hook=args.hook,
        top_k=args.top_k,
        max_new_tokens=args.generate,
        do_sample=args.sample,
        temperature=args.temperature,
        seed=args.seed,
        candidates=args.candidate,
    )
    if not isinstance(r, LMResult):
        print(json.dumps(r.rows) if args.json else format_search(r))
    elif args.json:
        print(
            json.dumps(
                {
                    "tokens": r.tokens,
                    "top_clean": r.top_clean,
                    "top_edited": r.top_edited,
                    "logit_diff": r.logit_diff,
                    "max_abs_logit_diff": r.max_abs_logit_diff,
                    "generated_clean": r.generated_clean,
                    "generated_edited": r.generated_edited,
                }
            )
        )
    else:
        print(format_lm_result(r))
    return 0


def _probe(args: argparse.Namespace) -> int:
    from analysis.evaluate import store_eval
    from analysis.probing import format_probe, load_labelled, probe_run
    from analysis.runs import load_run, load_run_model

    texts, y, classes = load_labelled(args.data)
    ctx = load_run(args.workspace, args.run)
    model = load_run_model(ctx, args.model)
    rep = probe_run(
        model,
        ctx,
        texts,
        y,
        classes,
        ks=args.ks,
        test_fraction=args.test_fraction,
        seed=args.seed,
        l2=args.l2,
    )
    record = {
        "data": str(args.data),
        "classes": classes,
        "n_train": rep.n_train,
        "n_test": rep.n_test,
        "rows": rep.rows,
    }
    store_eval(ctx.ws, args.run, "probe", record)
    print(json.dumps(record) if args.json else format_probe(rep))
    return 0
