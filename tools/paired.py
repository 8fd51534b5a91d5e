"""Two bundles on the same documents, paired: the command behind BENCHMARKS' "paired difference" figures.

    python tools/paired.py split BUNDLE test.jsonl          # the bundle's test split as JSONL (text, label)
    edge2dexit classify test.jsonl --bundle A --json --ordered -o a.jsonl
    edge2dexit classify test.jsonl --bundle B --json --ordered -o b.jsonl
    python tools/paired.py compare test.jsonl a.jsonl b.jsonl

`compare` prints each side's accuracy with its 95% Wilson interval, mean token-layers and the share the words
answered, then the paired difference (B − A) with its two-sided 95% normal interval. Pairing is what makes 1,080
documents enough: both sides are right on most of the same documents, so their difference varies far less than
either accuracy. Error records (documents a side could not classify) are left out of both sides."""

from __future__ import annotations

import argparse
import json

import numpy as np

from edge2dexit.bundle import load_bundle
from edge2dexit.convert.data import bundle_splits
from edge2dexit.stats import paired_lower_bound, wilson_interval


def write_test_split(bundle_dir: str, out: str) -> None:
    test = bundle_splits(load_bundle(bundle_dir)).test
    with open(out, "w", encoding="utf-8") as f:
        for text, label in zip(test.texts, test.labels):
            f.write(json.dumps({"text": text, "label": test.label_names[label]}) + "\n")
    print(f"{len(test.texts)} test documents → {out}")


def classified(path: str) -> dict[str, dict]:
    """classify --json records by their input ("file:line"), error records left out."""
    with open(path, encoding="utf-8") as f:
        return {record["input"]: record for record in map(json.loads, f) if "label" in record}


def compare(truth_path: str, a_path: str, b_path: str) -> None:
    with open(truth_path, encoding="utf-8") as f:
        truth = {f"{truth_path}:{i}": json.loads(line)["label"] for i, line in enumerate(f, start=1)}
    a, b = classified(a_path), classified(b_path)
    inputs = [key for key in truth if key in a and key in b]
    right_a, right_b = ([records[key]["label"] == truth[key] for key in inputs] for records in (a, b))
    for path, records, right in ((a_path, a, sum(right_a)), (b_path, b, sum(right_b))):
        low, high = wilson_interval(right, len(inputs))
        token_layers = np.mean([records[key]["token_layers"] for key in inputs])
        by_words = np.mean([records[key]["exit_layer"] == -1 for key in inputs])
        print(f"{path}: accuracy {right / len(inputs):.4f} ({low:.3f}–{high:.3f}), mean token-layers "
              f"{token_layers:.0f}, answered by the words {by_words:.1%}")
    # a two-sided 95% interval: the one-sided 97.5% bound from each side
    low, high = paired_lower_bound(right_b, right_a, 0.975), -paired_lower_bound(right_a, right_b, 0.975)
    print(f"paired difference (second − first) over {len(inputs)} documents: "
          f"{paired_lower_bound(right_b, right_a, 0):+.4f} (95%: {low:+.4f} to {high:+.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="write a bundle's test split as JSONL")
    split.add_argument("bundle")
    split.add_argument("out")
    pair = commands.add_parser("compare", help="compare two classify --json outputs on the same JSONL")
    pair.add_argument("truth")
    pair.add_argument("first")
    pair.add_argument("second")
    args = parser.parse_args()
    if args.command == "split":
        write_test_split(args.bundle, args.out)
    else:
        compare(args.truth, args.first, args.second)


if __name__ == "__main__":
    main()
