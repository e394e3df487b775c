"""The leaderboard (docs/leaderboard.md): every method on every dataset of benchmarks/leaderboard.yaml.

    python benchmarks/leaderboard.py                      # train what is missing, then write the page
    python benchmarks/leaderboard.py --only-existing      # train nothing: the page from the runs that exist
    python benchmarks/leaderboard.py --cached-only        # compute nothing either (sweeps, linear fits)

Every bench of the board goes through bench's own machinery into
``runs/leaderboard/ID/`` (finished runs with the same settings are reused, in
that folder or in the dataset's ``sources``), the robustness sweeps and linear
references are cached beside the runs, and the page is written atomically.
``--datasets ID,...`` limits training and computing to those datasets; the
page still shows every dataset, each row as measured as its runs allow.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import mmbalance  # noqa: F401  (registers every method)
from mmbalance.errors import MMBalanceError
from mmbalance.experiments.leaderboard import build_board, counts, load_board, write_board

DEFAULT_CONFIG = Path("benchmarks/leaderboard.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="leaderboard.py", description="Every method on every dataset of a board, ranked.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"the board file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--only-existing", action="store_true",
                        help="train nothing; rows without runs are 'not yet measured' (sweeps and the linear "
                             "reference of existing data are still computed and cached)")
    parser.add_argument("--cached-only", action="store_true",
                        help="compute nothing at all: runs, cached sweeps and cached linear references only")
    parser.add_argument("--datasets", default=None, metavar="ID,...",
                        help="train and compute only for these dataset ids (the page still shows every dataset)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, in processes (bench --jobs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars while training")
    return parser.parse_args(argv)


def regenerate_command(config: Path) -> str:
    """The one command that rebuilds the whole board, written at the top of the page."""
    return "python benchmarks/leaderboard.py" + ("" if config == DEFAULT_CONFIG else f" --config {shlex.quote(str(config))}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        board = load_board(args.config)
        only = [name.strip() for name in args.datasets.split(",") if name.strip()] if args.datasets else None
        result = build_board(board, train=not (args.only_existing or args.cached_only), compute=not args.cached_only,
                             only=only, jobs=args.jobs, quiet=args.quiet)
        written = write_board(result, regenerate_command(args.config), shlex.join(["python", "benchmarks/leaderboard.py", *argv]))
    except MMBalanceError as exc:
        print(f"leaderboard.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leaderboard.py: interrupted", file=sys.stderr)
        return 130
    planned, full, partly = counts(result.sections)
    print(f"{full} of {planned} planned rows measured" + (f", {partly} partly" if partly else "") + "; wrote "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
