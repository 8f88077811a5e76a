"""Flips one bit at every byte offset of one shard and reads it back through the store reader.

Prerequisites: a store written by `kdengine dump` (a small one: each flip re-opens and decodes the shard).
Run:  PYTHONPATH=$PWD python scripts/shard_flip_sweep.py STORE_DIR [--shard 0]
Works on a copy of STORE_DIR (the original is never touched) and prints one line: how many flips raised
StoreError, read identical targets, changed only a sample id's text, or gave wrong targets (must be 0).
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from kdengine.store import StoreError, open_store


def read(directory, which):
    shard = open_store(directory).shard(which)
    return [(s["input_ids"].numpy(), s["positions"].numpy(), s["topk_idx"].numpy(), s["topk_logp"].numpy(),
             s["index"], s["id"]) for s in (shard.sample(j) for j in range(len(shard)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store")
    parser.add_argument("--shard", type=int, default=0, help="which shard (manifest order)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(args.store, copy)
        path = copy / open_store(copy).manifest["shards"][args.shard]["file"]
        original = path.read_bytes()
        truth = read(copy, args.shard)
        counts = {"StoreError": 0, "identical": 0, "id text only": 0, "wrong targets": 0}
        for offset in range(len(original)):
            flipped = bytearray(original)
            flipped[offset] ^= 1 << (offset % 8)
            path.write_bytes(flipped)
            try:
                got = read(copy, args.shard)
            except StoreError:
                counts["StoreError"] += 1
                continue
            same = all(all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4])) and a[4] == b[4]
                       for a, b in zip(got, truth))
            if not same:
                counts["wrong targets"] += 1
                print(f"WRONG TARGETS at byte {offset}")
            else:
                counts["id text only" if any(a[5] != b[5] for a, b in zip(got, truth)) else "identical"] += 1
    header = 8 + int.from_bytes(original[:8], "little")
    print(f"{path.name}: {len(original)} bytes ({header} header), one bit flipped at each: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
