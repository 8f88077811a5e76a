"""The top-k store (format v2, v1 still read; see FORMAT.md): a directory of safetensors shards plus manifest.json.

    from kdengine.store import open_store
    store = open_store("out/")       # a torch Dataset
    sample = store[0]                # input_ids, positions, topk_idx, topk_logp, id, index
"""
from kdengine.store.codec import codec_names, make_codec
from kdengine.store.format import FORMAT_VERSION, StoreError, store_identity
from kdengine.store.reader import TopKStore, open_store
from kdengine.store.verify import VerifyReport, verify_store
from kdengine.store.writer import ShardBuilder, StoreHeader, StoreWriter

__all__ = [
    "FORMAT_VERSION", "ShardBuilder", "StoreError", "StoreHeader", "StoreWriter", "TopKStore", "VerifyReport",
    "codec_names", "make_codec", "open_store", "store_identity", "verify_store",
]
