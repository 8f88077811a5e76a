"""Reading a store: `open_store(DIR)` gives a map-style torch Dataset over every sample.

Shards are opened lazily, once per process (a DataLoader worker opens its own handles): opening one
reads its index, token ids and positions (v2 keeps them zstd-compressed) into memory, and `store[i]`
then reads and decodes one sample's frame and nothing else. Versions 1 and 2 are read. Each
sample's crc32 is checked before its frame is decoded, so a flipped byte becomes a StoreError naming
the shard and the sample, never silently wrong targets.
"""
from __future__ import annotations

import bisect
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kdengine.store.codec import CodecError, make_codec, shard_table_name, stored_table, table_from_stored
from kdengine.store.format import (
    FORMAT_NAME, OPTIONAL_TENSORS, SHARD_METADATA_KEYS, SHARD_METADATA_KEYS_V2, SHARD_TENSORS, StoreError,
    load_manifest, positions_from_gaps, sample_crc32, section_tensor, store_identity, targets_of, unpack_array,
)


def open_store(directory: str | Path) -> "TopKStore":
    """Opens the store in `directory` (reads manifest.json; shards open on first use).

    Raises:
        StoreError: no store there, an unknown format version, or a manifest that names files outside
            the directory.
    """
    return TopKStore(directory)


class TopKStore(torch.utils.data.Dataset):
    """All samples of a store, in shard (chunk) order, i.e. corpus order.

    `store[i]` is a dict:
        input_ids: int64 [T] the tokens the teacher read.
        positions: int64 [P] positions t whose next-token distribution is stored (it predicts
            input_ids[t + 1]).
        topk_idx: int32 [P, K'] token ids, sorted by descending teacher probability.
        topk_logp: float32 [P, K'] full-vocabulary log-probabilities at temperature 1; per row
            sum(exp(topk_logp)) <= 1 and the rest is the tail mass.
            K' = K for a fixed-K store. For an adaptive store (`top_p` set) K' is the sample's largest
            entry count (<= K) and a row with fewer entries is padded with id -1 and log-prob -inf
            (the loss skips them).
        id: str, the corpus line's id; index: int, the sample's index in the corpus.
        NAME: one more [P, width] tensor for each section the store has (FORMAT.md, "Sections").

    Attributes: path, manifest, version, targets, top_p, sections, k, vocab_size, teacher,
    tokenizer_fingerprint, codec (name), codec_params, num_tokens, num_positions, complete.
    A sampled-target store (`targets == "sample"`) has, instead of topk_idx/topk_logp, with K' the
    most distinct ids of a position in the sample (padding slots: id 0, count 0, logp 0):
        sample_idx: int32 [P, K'] the distinct drawn ids, ascending.
        sample_count: int32 [P, K'] how often each was drawn (sum: the store's `samples`).
        sample_logp: float32 [P, K'] the teacher's log-probabilities of those ids at T = 1.
        sample_log_norm: float32 [P] ln sum_v p_v^(1/tau) of the proposal (0 when tau = 1).

    Attributes: path, manifest, version, targets ("topk" or "sample"), top_p, sections, k,
    vocab_size, teacher, tokenizer_fingerprint, codec (name), codec_params, num_tokens, num_positions,
    complete, identity (`store_identity` of the manifest).
    """

    MAX_OPEN_SHARDS = 16  # each holds its token ids and positions in memory

    def __init__(self, directory: str | Path):
        self.path = Path(directory)
        self.manifest = load_manifest(self.path)
        m = self.manifest
        self.k, self.vocab_size = m["k"], m["vocab_size"]
        self.version = m["version"]
        self.targets, self.top_p, self.sections = targets_of(m)
        self.teacher, self.tokenizer_fingerprint = m["teacher"], m["tokenizer_fingerprint"]
        self.codec, self.codec_params = m["codec"].get("name"), m["codec"].get("params", {})
        self.complete = bool(m.get("complete"))
        self.identity = store_identity(m)
        self._shards = m["shards"]
        self._starts = np.cumsum([0] + [s["samples"] for s in self._shards]).tolist()
        self.num_tokens = sum(s["tokens"] for s in self._shards)
        self.num_positions = sum(s["positions"] for s in self._shards)
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> dict:
        which, j = self._locate(i)
        return self.shard(which).sample(j)

    def __getitems__(self, indices) -> list[dict]:
        """`[store[i] for i in indices]`, with each shard's frames decoded in one call (the DataLoader
        uses this for batched sampling; `TopKStore.samples` is the same)."""
        return self.samples(indices)

    def samples(self, indices) -> list[dict]:
        """The samples at `indices`, in that order; each shard's frames decoded in one call."""
        located = [self._locate(i) for i in indices]
        out: list = [None] * len(located)
        by_shard: dict[int, list[int]] = {}
        for at, (which, _) in enumerate(located):
            by_shard.setdefault(which, []).append(at)
        for which, ats in by_shard.items():
            for at, sample in zip(ats, self.shard(which).samples([located[a][1] for a in ats])):
                out[at] = sample
        return out

    def _locate(self, i) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a store of {n} samples")
        i = int(i) % n
        which = bisect.bisect_right(self._starts, i) - 1
        return which, i - self._starts[which]

    def shard(self, which: int) -> "_Shard":
        """The opened shard number `which` (manifest order), opening it in this process if needed; at
        most MAX_OPEN_SHARDS stay open (least recently used closed first)."""
        if self._pid != os.getpid():  # forked into a DataLoader worker: the parent's handles are not ours
            self._open, self._pid = OrderedDict(), os.getpid()
        if which in self._open:
            self._open.move_to_end(which)
        else:
            self._open[which] = _Shard(self.path, self._shards[which], self.manifest)
            if len(self._open) > self.MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        return self._open[which]

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()
        return state


class _Shard:
    """One opened shard file; checks it against its manifest entry before anything is read. The token
    ids, positions and sections are held in memory (v2 stores them compressed), the frames stay mapped."""

    def __init__(self, directory: Path, entry: dict, manifest: dict):
        self.name = entry["file"]
        path = directory / self.name
        where = f"{directory}/{self.name}"
        if not path.is_file():
            raise StoreError(f"{where}: missing (the manifest lists it with {entry['samples']} samples); "
                             f"re-run the dump command to rewrite it, or run `kdengine verify {directory}`")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"{where}: {size} bytes, the manifest says {entry['bytes']} (truncated or "
                             f"replaced); run `kdengine verify {directory}`, then re-dump the damaged shards")
        try:
            self._file = safe_open(str(path), framework="numpy")
            meta = self._file.metadata() or {}
            keys = set(self._file.keys())
        except Exception as exc:  # safetensors raises its own error types for unreadable headers
            raise StoreError(f"{where}: not a readable safetensors file ({exc}); "
                             f"run `kdengine verify {directory}`") from None
        self._where = where
        self.version = manifest["version"]
        self.targets, self.top_p, self.sections = targets_of(manifest)
        _check_shard_header(meta, keys, entry, manifest, where)
        self.token_offsets = self._tensor("token_offsets")
        self.position_offsets = self._tensor("position_offsets")
        self.frame_offsets = self._tensor("frame_offsets")
        self.sample_index = self._tensor("sample_index")
        self.sample_crc = self._tensor("sample_crc32")
        n = entry["samples"]
        for name in ("token_offsets", "position_offsets", "frame_offsets"):
            off = getattr(self, name)
            if off.shape != (n + 1,) or off[0] != 0 or np.any(np.diff(off) < 0):
                raise StoreError(f"{where}: tensor {name} is not {n + 1} non-decreasing offsets from 0; "
                                 f"run `kdengine verify {directory}`")
        _check_counts(self, entry, manifest, where)
        self.sample_ids = _sample_ids(meta["sample_ids"], n, where)
        self._payload = _mapped_tensor(path, "payload")
        n_tokens, n_positions = int(self.token_offsets[-1]), int(self.position_offsets[-1])
        if self.version == 1:
            self.input_ids = self._tensor("input_ids")
            self.positions = self._tensor("positions")
        else:
            self.input_ids = unpack_array(self._tensor("input_ids.zst"), "int32", n_tokens, f"{where}: input_ids.zst")
            gaps = unpack_array(self._tensor("position_gaps.zst"), "int32", n_positions, f"{where}: position_gaps.zst")
            self.positions = positions_from_gaps(gaps, self.position_offsets)
        if self.input_ids.shape != (n_tokens,) or self.positions.shape != (n_positions,):
            raise StoreError(f"{where}: {self.input_ids.shape[0]} token ids and {self.positions.shape[0]} positions, "
                             f"the offsets say {n_tokens} and {n_positions}; run `kdengine verify {directory}`")
        self.section_rows = {name: self._section(name, spec, n_positions) for name, spec in sorted(self.sections.items())}
        table_name = _codec_table_name(manifest, where)
        table = None
        if table_name and self.version == 1:
            table = self._tensor(table_name)
        elif table_name:
            stored = unpack_array(self._tensor(table_name + ".zst"), stored_table(manifest["codec"]["name"])[1],
                                  manifest["vocab_size"], f"{where}: {table_name}.zst")
            table = table_from_stored(manifest["codec"]["name"], stored)
        try:
            self.codec = make_codec(manifest["codec"]["name"], k=manifest["k"], vocab_size=manifest["vocab_size"],
                                    table=table, ragged=self.top_p is not None, **manifest["codec"].get("params", {}))
        except ValueError as exc:
            raise StoreError(f"{where}: cannot build codec {manifest['codec']!r}: {exc}") from None

    def _tensor(self, name):
        try:
            return self._file.get_tensor(name)
        except Exception as exc:
            raise StoreError(f"{self._where}: tensor {name!r} unreadable ({exc})") from None

    def _section(self, name, spec, n_positions):
        tensor = section_tensor(name, spec)
        shape = (n_positions, spec["width"])
        if spec.get("compressed"):
            rows = unpack_array(self._tensor(tensor), spec["dtype"], shape[0] * shape[1], f"{self._where}: {tensor}")
        else:
            rows = self._tensor(tensor)
        if rows.dtype != np.dtype(spec["dtype"]) or rows.size != shape[0] * shape[1]:
            raise StoreError(f"{self._where}: section tensor {tensor!r} is {rows.dtype} x {rows.size}, the manifest "
                             f"says {spec['dtype']} [{shape[0]}, {shape[1]}]")
        return rows.reshape(shape)

    def __len__(self) -> int:
        return len(self.sample_index)

    def raw(self, j: int):
        """(input_ids int32 [T], positions int32 [P], frame bytes, {section: rows}) of local sample j,
        crc-checked."""
        t0, t1 = self.token_offsets[j:j + 2]
        p0, p1 = self.position_offsets[j:j + 2]
        f0, f1 = self.frame_offsets[j:j + 2]
        input_ids = self.input_ids[t0:t1]
        positions = self.positions[p0:p1]
        if f1 > self._payload.size:
            raise StoreError(f"{self._where}: sample {j} (corpus index {self.sample_index[j]}) lies outside "
                             f"the payload ({f1} > {self._payload.size} bytes)")
        frame = self._payload[f0:f1].tobytes()
        sections = {name: rows[p0:p1] for name, rows in self.section_rows.items()}
        if sample_crc32(input_ids, positions, frame, sections.values()) != int(self.sample_crc[j]):
            raise StoreError(f"{self._where}: sample {j} (corpus index {self.sample_index[j]}) fails its crc32 "
                             f"check (corrupt bytes); run `kdengine verify {Path(self._where).parent}` "
                             f"and re-dump the damaged shard")
        return input_ids, positions, frame, sections

    def samples(self, js: list[int]) -> list[dict]:
        """Local samples js (crc-checked), their frames decoded in one codec call where the codec has
        one (`decode_many`), else one by one; the same dicts as `sample`."""
        if not hasattr(self.codec, "decode_many") or len(js) < 2:
            return [self.sample(j) for j in js]
        raws = [self.raw(j) for j in js]
        frames = [r[2] for r in raws]
        try:
            idx, logp, counts = self.codec.decode_many(
                b"".join(frames), _offsets(len(f) for f in frames), np.concatenate([r[0] for r in raws]),
                _offsets(len(r[0]) for r in raws), np.concatenate([r[1] for r in raws]),
                _offsets(len(r[1]) for r in raws))
        except CodecError as exc:
            which = int(str(exc).split(":", 1)[0].split()[-1]) if str(exc).startswith("frame ") else 0
            j = js[which]
            raise StoreError(f"{self._where}: sample {j} (corpus index {self.sample_index[j]}) does not "
                             f"decode: {str(exc).split(': ', 1)[-1]}") from None
        out, at = [], 0
        for j, (input_ids, positions, _, sections) in zip(js, raws):
            rows = slice(at, at + len(positions))
            at += len(positions)
            width = self.codec.k if counts is None else (int(counts[rows].max()) if len(positions) else 1)
            out.append(self._sample_dict(j, input_ids, positions, np.ascontiguousarray(idx[rows, :width]),
                                         np.ascontiguousarray(logp[rows, :width]), sections))
        return out

    def sample(self, j: int) -> dict:
        input_ids, positions, frame, sections = self.raw(j)
        if self.targets == "sample":
            return self._sampled(j, input_ids, positions, frame, sections)
        try:
            idx, logp = self.codec.decode(frame, input_ids, positions)
        except CodecError as exc:
            raise StoreError(f"{self._where}: sample {j} (corpus index {self.sample_index[j]}) does not "
                             f"decode: {exc}") from None
        if idx.shape[0] != positions.shape[0]:
            raise StoreError(f"{self._where}: sample {j} holds {idx.shape[0]} target rows for "
                             f"{positions.shape[0]} positions")
        return self._sample_dict(j, input_ids, positions, idx, logp, sections)

    def _sample_dict(self, j, input_ids, positions, idx, logp, sections) -> dict:
        out = {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "positions": torch.from_numpy(positions.astype(np.int64)),
            "topk_idx": torch.from_numpy(idx),
            "topk_logp": torch.from_numpy(logp),
            "id": self.sample_ids[j],
            "index": int(self.sample_index[j]),
        }
        for name, rows in sections.items():
            out[name] = torch.from_numpy(np.array(rows))
        return out

    def _sampled(self, j: int, input_ids, positions, frame, sections) -> dict:
        try:
            ids, counts, logp, log_norm = self.codec.decode(frame)
        except CodecError as exc:
            raise StoreError(f"{self._where}: sample {j} (corpus index {self.sample_index[j]}) does not "
                             f"decode: {exc}") from None
        if ids.shape[0] != positions.shape[0]:
            raise StoreError(f"{self._where}: sample {j} holds {ids.shape[0]} target rows for "
                             f"{positions.shape[0]} positions")
        out = {
            "input_ids": torch.from_numpy(input_ids.astype(np.int64)),
            "positions": torch.from_numpy(positions.astype(np.int64)),
            "sample_idx": torch.from_numpy(ids),
            "sample_count": torch.from_numpy(counts),
            "sample_logp": torch.from_numpy(logp),
            "sample_log_norm": torch.from_numpy(log_norm),
            "id": self.sample_ids[j],
            "index": int(self.sample_index[j]),
        }
        for name, rows in sections.items():
            out[name] = torch.from_numpy(np.array(rows))
        return out


def _mapped_tensor(path: Path, name: str) -> np.ndarray:
    """A uint8 tensor of a safetensors file, memory-mapped (read-only, no copy)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        start, end = json.loads(f.read(n))[name]["data_offsets"]
    if end == start:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n + start, shape=(end - start,))


def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(list(lengths), dtype=np.int64)]).astype(np.int64)


def _check_shard_header(meta: dict, keys: set, entry: dict, manifest: dict, where: str) -> None:
    version = manifest["version"]
    missing = [k for k in (SHARD_METADATA_KEYS if version == 1 else SHARD_METADATA_KEYS_V2) if k not in meta]
    if missing:
        raise StoreError(f"{where}: __metadata__ lacks {missing}; not a kdengine shard")
    if meta["format"] != FORMAT_NAME or meta["version"] != str(version):
        raise StoreError(f"{where}: format {meta['format']!r} version {meta['version']!r}, expected "
                         f"{FORMAT_NAME!r} version {version} (as the manifest says)")
    _check_against_manifest(meta, entry, manifest, where)
    if version == 1 and meta.get("targets", "topk") != manifest.get("targets", "topk"):
        raise StoreError(f"{where}: __metadata__['targets'] is {meta.get('targets', 'topk')!r}, the manifest "
                         f"expects {manifest.get('targets', 'topk')!r}")
    table = _codec_table_name(manifest, where)
    wanted = dict(SHARD_TENSORS[version])
    if table:
        wanted[table if version == 1 else table + ".zst"] = OPTIONAL_TENSORS[table] if version == 1 else "uint8"
    for name, spec in targets_of(manifest)[2].items():
        wanted[section_tensor(name, spec)] = "uint8" if spec.get("compressed") else spec["dtype"]
    for name, dtype in wanted.items():
        if name not in keys:
            why = f"; codec {manifest['codec']['name']!r} needs it" if table and name.startswith(table) else ""
            raise StoreError(f"{where}: tensor {name!r} ({dtype}) is missing{why}")
    unknown = keys - set(wanted)
    if unknown:
        raise StoreError(f"{where}: unexpected tensors {sorted(unknown)}")


def _check_against_manifest(meta: dict, entry: dict, manifest: dict, where: str) -> None:
    """The shard is the authority: every __metadata__ key that the manifest also states (at the top,
    as codec name/params, or in the shard's entry) must hold the same value, compared as JSON values,
    so that an edited manifest (a codec parameter, k, the fingerprint, a count) cannot change how
    the shard is read."""
    stated = {key: value for key, value in manifest.items() if key not in ("shards", "codec")}
    stated.update(codec=manifest["codec"]["name"], codec_params=manifest["codec"].get("params", {}), **entry)
    for key, raw in meta.items():
        if key in _NOT_COMPARED or key not in stated:
            continue
        want = stated[key]
        if isinstance(want, str):
            same = raw == want
        else:
            try:
                same = json.loads(raw) == want and type(json.loads(raw)) is type(want)
            except ValueError:
                same = False
        if not same:
            raise StoreError(f"{where}: the shard says {key} = {raw}, the manifest says {key} = "
                             f"{json.dumps(want)}; the shard is the authority: the manifest was edited or "
                             f"belongs to another store - re-run the dump command to rebuild it from parts/, "
                             f"then `kdengine verify {Path(where).parent}`")


_NOT_COMPARED = ("format", "version", "sample_ids")  # checked on their own


def _check_counts(shard: "_Shard", entry: dict, manifest: dict, where: str) -> None:
    """The entry's counts against the shard's own tensors, and its corpus indices against its chunk."""
    n = entry["samples"]
    for key, offsets, tensor in (("tokens", shard.token_offsets, "input_ids"),
                                 ("positions", shard.position_offsets, "positions"),
                                 ("payload_bytes", shard.frame_offsets, "payload")):
        if manifest["version"] >= 2 and tensor != "payload":
            length = [int(offsets[-1])]  # v2 stores it compressed: its length is checked when it is unpacked
        else:
            length = shard._file.get_slice(tensor).get_shape()
        if [int(offsets[-1])] != length or int(offsets[-1]) != entry[key]:
            raise StoreError(f"{where}: holds {length} {tensor} entries with offsets ending at {int(offsets[-1])}, "
                             f"the manifest says {key} = {entry[key]}; run `kdengine verify {Path(where).parent}`")
    if shard.sample_index.shape != (n,) or shard.sample_crc.shape != (n,):
        raise StoreError(f"{where}: sample_index/sample_crc32 do not hold {n} entries")
    per_shard = manifest.get("dump", {}).get("shard_samples")
    if isinstance(per_shard, int) and not isinstance(per_shard, bool):
        first = entry["chunk"] * per_shard
        if n > per_shard or not np.array_equal(shard.sample_index, np.arange(first, first + n)):
            raise StoreError(f"{where}: holds corpus samples {shard.sample_index[:3].tolist()}..., chunk "
                             f"{entry['chunk']} of {per_shard} samples holds {first}..{first + n - 1}; "
                             f"run `kdengine verify {Path(where).parent}`")


def _sample_ids(raw: str, n: int, where: str) -> list[str]:
    try:
        ids = json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{where}: __metadata__['sample_ids'] is not valid JSON ({exc}); the shard is damaged: "
                         f"`kdengine verify {Path(where).parent} --drop-bad`, then re-run the dump") from None
    if not isinstance(ids, list) or len(ids) != n or not all(isinstance(i, str) for i in ids):
        raise StoreError(f"{where}: __metadata__['sample_ids'] is not a list of {n} strings; the shard is "
                         f"damaged: `kdengine verify {Path(where).parent} --drop-bad`, then re-run the dump")
    return ids


def _codec_table_name(manifest: dict, where: str) -> str | None:
    """The codec's per-shard table tensor: v1 `id_prior`/`vocab_order`, v2 `id_count_codes`/`vocab_order`
    (stored as NAME.zst)."""
    try:
        name = manifest["codec"].get("name")
        table = shard_table_name(name)
        if manifest["version"] >= 2:
            stored = stored_table(name)
            table = stored[0] if stored else None
        return table
    except ValueError as exc:
        raise StoreError(f"{where}: {exc}; this kdengine cannot read the store") from None
