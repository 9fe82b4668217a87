"""Write the built-in synthetic splits to disk in APIGen-MT format.

    python -m data.synthetic --out data_out --seed 0
    python -m data.synthetic --out data_out --seed 1 --n-train 200 --n-test 50 --n-ood 50 --n-coldstart 60

Writes train.json, test.json, ood_test.json and coldstart.json and prints, per split, the number
of conversations, assistant actions, tool-call actions and reasoning-annotated actions.
"""

from __future__ import annotations

import argparse
import json

from data.synthetic import write_splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=1000, help="train conversations")
    parser.add_argument("--n-test", type=int, default=200, help="in-domain test conversations")
    parser.add_argument("--n-ood", type=int, default=200, help="out-of-domain (telecom) test conversations")
    parser.add_argument("--n-coldstart", type=int, default=100,
                        help="reasoning-annotated actions in the cold-start split (<= 100)")
    args = parser.parse_args(argv)
    try:
        paths = write_splits(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test, n_ood=args.n_ood,
                             n_coldstart=args.n_coldstart)
    except ValueError as problem:
        parser.error(str(problem))
    for split, path in paths.items():
        rows = json.loads(path.read_text(encoding="utf-8"))
        entries = [entry for row in rows for entry in row["conversations"]]
        actions = sum(entry["from"] in ("gpt", "function_call") for entry in entries)
        calls = sum(entry["from"] == "function_call" for entry in entries)
        reasoning = sum("reasoning" in entry for entry in entries)
        print(f"{split:10s} {len(rows):5d} conversations {actions:6d} actions {calls:6d} tool calls "
              f"{reasoning:4d} with reasoning -> {path}")


if __name__ == "__main__":
    main()
