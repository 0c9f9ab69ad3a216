"""On-disk stores: sharded ragged Zarr v3 arrays + Parquet tables + an atomic JSON manifest."""

from cdm.storage.fields import FieldSpec
from cdm.storage.fs import Location
from cdm.storage.ragged import RaggedShardWriter, RaggedStoreReader, StoreError
from cdm.storage.teacher import TeacherSequence, TeacherStore, TeacherStoreWriter
from cdm.storage.verify import VerifyReport, store_info, verify_map_store, verify_store

__all__ = [
    "FieldSpec",
    "Location",
    "RaggedShardWriter",
    "RaggedStoreReader",
    "StoreError",
    "TeacherSequence",
    "TeacherStore",
    "TeacherStoreWriter",
    "VerifyReport",
    "store_info",
    "verify_map_store",
    "verify_store",
]
