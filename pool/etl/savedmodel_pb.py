"""The reader of ``saved_model.pb`` moved to the core (:mod:`pool.savedmodel_pb`), which
checks a pool's signature before any worker starts; re-exported here for the file jobs and
``python -m pool inspect``."""

from ..savedmodel_pb import peek_signature, read_signatures

__all__ = ["peek_signature", "read_signatures"]
