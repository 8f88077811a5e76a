"""`verify_store`: checks the manifest against the directory and the shards (the shard is the
authority), every shard's sha256, and decodes every frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kdengine.checksum import sha256_file
from kdengine.store.format import MANIFEST, SHARD_RE, StoreError
from kdengine.store.reader import TopKStore


@dataclass
class VerifyReport:
    """problems: one line per bad, missing or unlisted shard (file: why) or store-wide fault, empty
    when the store is whole. bad_files: the shard files `--drop-bad` removes. notes: things that do
    not make the store wrong."""

    directory: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    bad_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(directory: str | Path, *, progress: bool = True) -> VerifyReport:
    """Checks a whole store: the manifest (types, one entry per chunk in order, totals), then for every
    shard its size, sha256, header against the manifest entry, counts against its tensors, corpus
    indices against its chunk, and every sample's crc32, decoding and shapes; then that the shard list
    covers chunks 0..chunks_total-1 exactly once, full chunks before the last, that every shard file on
    disk is listed, and that the store has at least one target position.

    Raises:
        StoreError: the manifest itself is unusable (nothing else can be checked).
    """
    directory = Path(directory)
    store = TopKStore(directory)
    report = VerifyReport(str(directory))
    listed = {s["file"] for s in store.manifest["shards"]}
    bar = tqdm(total=store.num_positions, unit="pos", desc="verify", disable=not progress)
    for which, entry in enumerate(store.manifest["shards"]):
        report.shards += 1
        problem = _check_shard(store, which, entry, directory, bar)
        if problem:
            report.problems.append(f"{entry['file']}: {problem}")
            report.bad_files.append(entry["file"])
        else:
            report.samples += entry["samples"]
    bar.close()
    report.problems += _coverage_problems(store.manifest)
    if store.num_positions == 0:
        report.problems.append(f"{MANIFEST}: the store holds no target position; dump a corpus with targets")
    for path in sorted(directory.glob("shard-*.safetensors")):
        if SHARD_RE.match(path.name) and path.name not in listed:
            report.problems.append(f"{path.name}: on disk but not listed in {MANIFEST} (an entry was removed, "
                                   f"or an interrupted dump left it; re-running the dump rewrites it)")
            report.bad_files.append(path.name)
    return report


def _coverage_problems(m: dict) -> list[str]:
    """The shard list against chunks 0..chunks_total-1: each exactly once (format.check_manifest has
    refused duplicates), and every chunk but the last full."""
    if m.get("chunks_total") is None:
        return [f"{MANIFEST}: the dump has not finished (no rank has recorded its end); "
                f"re-run the same `kdengine dump` command to complete it"]
    total, have = m["chunks_total"], [s["chunk"] for s in m["shards"]]
    problems = []
    missing = sorted(set(range(total)) - set(have))
    if missing:
        problems.append(f"{MANIFEST}: chunks {_ranges(missing)} of {total} are not listed (the dump is "
                        f"incomplete or an entry was removed); re-run the same `kdengine dump` command")
    extra = [c for c in have if c >= total]
    if extra:
        problems.append(f"{MANIFEST}: chunks {_ranges(extra)} are listed but the dump recorded only {total}")
    if not missing and not extra and not m.get("complete"):
        problems.append(f"{MANIFEST}: every chunk is listed but the manifest is not marked complete")
    per_shard = m.get("dump", {}).get("shard_samples")
    if isinstance(per_shard, int):
        short = [s["chunk"] for s in m["shards"] if s["chunk"] < total - 1 and s["samples"] != per_shard]
        if short:
            problems.append(f"{MANIFEST}: chunks {_ranges(short)} do not hold {per_shard} samples each, so "
                            f"the sample ranges are not contiguous; re-dump into a new --out directory")
    return problems


def _check_shard(store, which, entry, directory, bar) -> str | None:
    path = directory / entry["file"]
    if not path.is_file():
        return f"missing (the manifest lists it with {entry['samples']} samples)"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        return f"sha256 {digest[:16]}..., the manifest says {entry['sha256'][:16]}... (corrupt bytes)"
    try:
        shard = store.shard(which)
        positions = 0
        for j in range(len(shard)):
            sample = shard.sample(j)
            if "sample_idx" in sample:  # sampled targets: at most k (= draws) distinct ids per position
                rows, width = sample["sample_idx"].shape
                if rows != len(sample["positions"]) or width > store.k:
                    return f"sample {j}: sampled targets of shape {(rows, width)}"
            elif sample["topk_idx"].shape[0] != len(sample["positions"]) or not (
                    sample["topk_idx"].shape[1] <= store.k if store.top_p else sample["topk_idx"].shape[1] == store.k):
                return f"sample {j}: top-k of shape {tuple(sample['topk_idx'].shape)}"
            positions += len(sample["positions"])
            bar.update(len(sample["positions"]))
    except StoreError as exc:
        return str(exc).split(": ", 1)[-1]
    if positions != entry["positions"]:
        return f"holds {positions} target positions, the manifest says {entry['positions']}"
    return None


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
