"""The tokenizer guard: a student may train on a store only if it reads the same token ids the teacher
wrote and has an output row for every teacher id."""
from __future__ import annotations

import warnings

from kdengine.teachers.fingerprint import V1_NOTE, fingerprint_version
from kdengine.train.errors import TrainError


def check_student_matches_store(
    *,
    student_dir: str,
    student_fingerprint: str,
    student_vocab: int,
    store_dir: str,
    store_fingerprint: str,
    store_vocab: int,
) -> None:
    """Raises TrainError unless the student's tokenizer fingerprint equals the store's and its vocabulary
    (output rows) covers the teacher's. A larger student vocabulary (padded embedding) is fine: teacher
    id i is student row i.

    Args:
        student_fingerprint: `tokenizer_fingerprint(student_tokenizer, like=store_fingerprint)` (the
            store's fingerprint version, so a version 1 store compares as it was written).
        student_vocab: rows of the student's output head (logits width).
        store_fingerprint, store_vocab: from the store's manifest (the teacher's tokenizer and logits width).
    """
    try:
        version = fingerprint_version(store_fingerprint)
    except ValueError as exc:
        raise TrainError(f"{store_dir}: {exc}") from None
    if version == 1:
        warnings.warn(f"{store_dir}: {V1_NOTE}", stacklevel=2)
    if student_fingerprint != store_fingerprint:
        raise TrainError(
            f"tokenizer mismatch: student {student_dir} has tokenizer fingerprint {student_fingerprint[:16]}..., "
            f"but store {store_dir} was dumped with {store_fingerprint[:16]}...; token ids would not line up. "
            "Use a student made from the store's teacher (`kdengine make-student --teacher TEACHER ...`) or "
            "dump the store with a teacher that shares the student's tokenizer"
        )
    if student_vocab < store_vocab:
        raise TrainError(
            f"vocabulary too small: student {student_dir} has {student_vocab} output rows, but store {store_dir} "
            f"holds teacher ids up to {store_vocab - 1} (teacher vocab {store_vocab}); the student's embedding "
            f"and output head need at least {store_vocab} rows (resize_token_embeddings({store_vocab}))"
        )
