#!/usr/bin/env python
"""
Effectiveness on the synthetic shapes data: paired runs with the same schedule and seed —
the student alone vs each method, and PKD + GID composed — evaluated by COCOEvaluator and
printed as one table with AP deltas (through ``detkd.demo``; finished runs are reused).

    python benchmarks/effectiveness.py [--iters 1000] [--output output/bench/effectiveness]
        [--seeds 0 1 2] [--heldout 1024]

With several ``--seeds`` every student run is repeated per seed (same teacher) and the table
gives each row's mean and standard deviation, with deltas paired by seed. ``--heldout N`` adds
the same table on a held-out split of N images (seed 7) that no run trained on or was chosen by.
"""

import argparse

from detkd.demo import int_at_least
from detkd.demo import main as demo


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int_at_least(1), default=None)
    parser.add_argument("--output", default="output/bench/effectiveness")
    parser.add_argument(
        "--methods", nargs="+", default=["pkd", "reviewkd", "gid", "pkdgid", "d3etr"]
    )
    parser.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0])
    parser.add_argument("--heldout", type=int_at_least(0), default=0, metavar="N")
    args = parser.parse_args()
    argv = ["--methods", *args.methods, "--output", args.output, "--seeds", *map(str, args.seeds)]
    argv += ["--heldout", str(args.heldout)]
    if args.iters:
        argv += ["--iters", str(args.iters)]
    demo(argv)


if __name__ == "__main__":
    main()
