"""Fuzzing the readers with structure-aware damage to real conversions (tests/fuzz_reader.py).

CI runs a fixed seed and a small count (a few seconds); ``scripts/fuzz-reader N [--seed S]`` runs more.
"""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("transformers")

from fuzz_reader import fuzz  # noqa: E402

SEED = 20260517
COUNT = int(os.environ.get("EXMY_FUZZ_CASES", "400"))


def test_fuzz_readers(tmp_path):
    began = time.perf_counter()
    stats = fuzz(COUNT, SEED, tmp_path)
    seconds = time.perf_counter() - began
    print(f"\n[fuzz] seed {SEED}: {stats['cases']} cases ({stats['accepted']} accepted, "
          f"{stats['refused']} refused alike by every reader) in {seconds:.1f} s")
    assert stats["cases"] == COUNT and stats["refused"] > COUNT // 2 and stats["accepted"] > 0
