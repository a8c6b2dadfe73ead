"""`saewb`: one command line for every stage of the workbench."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from saewb import __version__

Registrar = Callable[[argparse._SubParsersAction], None]


def _registrars() -> list[Registrar]:
    """Each stage adds its own subcommands; imports stay inside so `saewb --help` stays fast."""
    from activations import cli as activations_cli
    from analysis import analyze_cli, eval_cli, explain_cli
    from app import cli as app_cli
    from sae import cli as sae_cli
    from sae import interop_cli, sweep_cli

    return [
        activations_cli.register,
        sae_cli.register,
        sweep_cli.register,
        eval_cli.register,
        analyze_cli.register,
        explain_cli.register,
        app_cli.register,
        interop_cli.register,
        analyze_cli.register_exports,
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saewb",
        description="SAE Workbench: harvest activations, train sparse autoencoders, analyse and browse features.",
    )
    parser.add_argument("--version", action="version", version=f"saewb {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback when a command fails (default: one line with the fix)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from saewb.progress import quiet_library_bars

    quiet_library_bars()  # before any command loads transformers: no foreign bars in a log
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        from saewb.errors import describe

        # One line with the problem and the fix (saewb/errors.py); a traceback would bury it.
        print(f"saewb {args.command}: error: {describe(err)}", file=sys.stderr)
        return 1


def entry() -> int:
    """The `saewb` program: once under huge-page malloc (see saewb.hugepages), then main()."""
    from saewb.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
