"""`verify_store`: checks every shard's sha256 against the manifest and decodes every frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from kdengine.checksum import sha256_file
from kdengine.store.format import MANIFEST, SHARD_RE, StoreError
from kdengine.store.reader import TopKStore


@dataclass
class VerifyReport:
    """problems: one line per bad or missing shard (file: why), empty when the store is whole.
    notes: things that do not make the store wrong (e.g. a shard file the manifest does not list)."""

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
    """Checks a whole store: the manifest, then for every shard its size, sha256, header, and every
    sample's crc32, decoding and shapes; then that the dump finished (every chunk present).

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
    m = store.manifest
    if not m.get("complete"):
        if m.get("chunks_total") is None:
            report.problems.append(f"{MANIFEST}: the dump has not finished (no rank has recorded its end); "
                                   f"re-run the same `kdengine dump` command to complete it")
        else:
            have = {s["chunk"] for s in m["shards"]}
            missing = [c for c in range(m["chunks_total"]) if c not in have]
            report.problems.append(f"{MANIFEST}: the dump is incomplete, chunks {_ranges(missing)} of "
                                   f"{m['chunks_total']} are missing; re-run the same `kdengine dump` command")
    for path in sorted(directory.glob("shard-*.safetensors")):
        if SHARD_RE.match(path.name) and path.name not in listed:
            report.notes.append(f"{path.name}: not listed in {MANIFEST} (left by an interrupted dump; "
                                f"the next run of the dump rewrites it)")
    return report


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
        if len(shard) != entry["samples"]:
            return f"holds {len(shard)} samples, the manifest says {entry['samples']}"
        per_shard = store.manifest.get("dump", {}).get("shard_samples")
        if per_shard:
            first = entry["chunk"] * per_shard
            if shard.sample_index.tolist() != list(range(first, first + len(shard))):
                return (f"holds corpus samples starting {shard.sample_index.tolist()[:3]}, chunk {entry['chunk']} "
                        f"should hold {first}..{first + len(shard) - 1}")
        positions = 0
        for j in range(len(shard)):
            sample = shard.sample(j)
            if "sample_idx" in sample:  # sampled targets: at most k (= draws) distinct ids per position
                rows, width = sample["sample_idx"].shape
                if rows != len(sample["positions"]) or width > store.k:
                    return f"sample {j}: sampled targets of shape {(rows, width)}"
            elif tuple(sample["topk_idx"].shape) != (len(sample["positions"]), store.k):
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
