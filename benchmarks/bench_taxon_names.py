"""What the shipped-taxonomy near-spelling rule of ``references add`` (``index.taxonomy.NEAR_SPELLING``) catches and
what it refuses by mistake, at that cutoff and at the log's ``SUGGESTION`` one:

- typos: a sample of the taxonomy's species, each with one random edit (a letter changed, missing, added, or two
  swapped), spelt as no taxon is: how many are refused naming the species meant;
- real species the list lacks: each taxonomy species taken out of the list in turn (leave-one-out): how many would
  be refused as a near-spelling of another one (``--new-species`` / ``new_species=true`` then confirms it).

No model, no shared assets; about a minute in all on one core (Intel Xeon with AMX). Run from the repository root:
``PYTHONPATH=. python benchmarks/bench_taxon_names.py`` (``--quick``: a smoke run of seconds, figures not to quote).
"""

from __future__ import annotations

import argparse
import difflib
import random

from _hardware import machine_report


def _typo(key: str, rng: random.Random) -> str:
    """``key`` with one random edit."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    i, op = rng.randrange(len(key)), rng.choice("cmas")
    if op == "c":
        return key[:i] + rng.choice(letters) + key[i + 1:]
    if op == "m":
        return key[:i] + key[i + 1:]
    if op == "a":
        return key[:i] + rng.choice(letters) + key[i:]
    i = min(i, len(key) - 2)
    return key[:i] + key[i + 1] + key[i] + key[i + 2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--typos", type=int, default=None, help="species given a typo (default 300; --quick: 20)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 20 typos (unless --typos), and the leave-one-out over 200 sampled taxa "
                    "instead of every one")
    args = ap.parse_args()
    print(machine_report())
    from index.taxonomy import NEAR_SPELLING, SUGGESTION, _taxonomy, taxonomy_lookalikes

    table = _taxonomy()
    keys = list(table)
    rng = random.Random(args.seed)
    n = args.typos if args.typos is not None else (20 if args.quick else 300)
    typos = [(k, t) for k in rng.sample(keys, n) if (t := _typo(k, rng)) not in table]
    left_out = rng.sample(keys, 200) if args.quick else keys  # the leave-one-out: the part that costs
    print(f"{len(keys)} taxa in the shipped taxonomy; {len(typos)} one-edit typos (seed {args.seed})")
    for cutoff in (NEAR_SPELLING, SUGGESTION):
        caught = sum(table[k] in taxonomy_lookalikes(t, cutoff) for k, t in typos)
        lone = sum(bool(difflib.get_close_matches(k, [o for o in keys if o != k], n=1, cutoff=cutoff))
                   for k in left_out)
        print(f"cutoff {cutoff}: typos refused naming the species meant {caught}/{len(typos)}; species left out of "
              f"the list that would be refused {lone}/{len(left_out)} ({100 * lone / len(left_out):.1f}%)")


if __name__ == "__main__":
    main()
