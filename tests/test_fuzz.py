"""Mutation fuzzing in CI (issue 19): a fixed seed, 300 mutations of each reader's seed file; every one is read or
refused with the reader's typed error. bench/fuzz.py runs more (python bench/fuzz.py --n 20000 --seed 1)."""

from __future__ import annotations

import fuzz_readers
import pytest


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz_readers.seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.mark.parametrize("kind", sorted(fuzz_readers.READERS))
def test_every_mutated_file_is_read_or_refused_with_a_typed_error(seeds, kind, tmp_path):
    counts = fuzz_readers.run(kind, seeds[kind], tmp_path, n=300, seed=2026)
    assert counts["read"] + counts["refused"] == 300
    assert counts["refused"] >= 100  # the mutations reach the checks, not only bytes nobody reads
    assert not list(tmp_path.glob(".*.tmp"))  # a refused import leaves nothing half-written
