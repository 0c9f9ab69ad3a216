"""TEMPORARY minimal codec (lead) until the measured codecs land; replaced wholesale."""
from __future__ import annotations
import numpy as np
from cdm.storage.fields import FieldSpec, blosc_zstd

class LosslessCodec:
    name = "lossless"
    def fields(self, k):
        return {"topk_ids": FieldSpec("int32", (k,), (blosc_zstd(),)), "topk_values": FieldSpec("float16", (k,), (blosc_zstd(),))}
    def encode(self, ids, logprobs):
        return {"topk_ids": np.ascontiguousarray(ids, dtype=np.int32), "topk_values": logprobs.astype(np.float16)}
    def decode(self, arrays):
        return arrays["topk_ids"].astype(np.int32), arrays["topk_values"].astype(np.float32)
    def describe(self):
        return {"name": "lossless", "params": {}}

def get_codec(name, **params):
    return LosslessCodec()
