#!/usr/bin/env python
"""
Effectiveness on the synthetic shapes data: paired runs with the same schedule and seed —
the student alone vs each method, and PKD + GID composed — evaluated by COCOEvaluator and
printed as one table with AP deltas (through ``detkd.demo``; finished runs are reused).

    python benchmarks/effectiveness.py [--iters 1000] [--output output/bench/effectiveness]
"""
import argparse

from detkd.demo import main as demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--output", default="output/bench/effectiveness")
    parser.add_argument("--methods", nargs="+", default=["pkd", "reviewkd", "gid", "pkdgid", "d3etr"])
    args = parser.parse_args()
    argv = ["--methods", *args.methods, "--output", args.output]
    if args.iters:
        argv += ["--iters", str(args.iters)]
    demo(argv)


if __name__ == "__main__":
    main()
