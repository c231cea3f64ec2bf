"""Adversary of the per-object append model (native/journal_append.pml): resolve, the wrap.

The model checks resolve() as one atomic step; C cannot.  A copy of the model
with resolve split into its real steps (tests/models/journal_resolve_order.pml)
shows which order is safe: reading the object's generation (the evidence)
before proving the record's writer dead voids a committed change's record
when the writer commits and dies between the two reads (MUTANT 10, must
fail); header and fields, then the liveness proof, then the evidence, then a
CAS of the exact header read, holds (MUTANT 11).

A second finding: the model's claim at the wrap refuses a record whose
writer lives even when the evidence proves its change committed (a writer
stopped between C3 and C4): every commit at the wrap stalls although any
claimer could complete the record (MUTANT 14 asserts it never happens: must
fail); resolving it by its evidence first keeps every assertion (MUTANT 12).

Forbidden outcome: the split model holding with the evidence read first (it
could not catch the bug), or failing with the safe order; the same for 14/12.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

MODEL = pathlib.Path(__file__).parent / "models" / "journal_resolve_order.pml"


def pan(tmp: pathlib.Path, mutant: int) -> str:
    """Run Spin exhaustively on the split model with ``mutant``; pan's report."""
    shutil.copy(MODEL, tmp / "m.pml")
    subprocess.run(["spin", f"-DMUTANT={mutant}", "-a", "m.pml"], cwd=tmp, check=True,
                   capture_output=True)
    subprocess.run(["cc", "-O2", "-w", "-DSAFETY", "-o", "pan", "pan.c"], cwd=tmp, check=True)
    out = subprocess.run(["./pan", "-m200000"], cwd=tmp, capture_output=True, text=True,
                         timeout=1200).stdout
    assert "max search depth too small" not in out, out
    return out


@pytest.mark.slow
class TestResolveOrder:
    @pytest.mark.parametrize("mutant,fails", [(0, False), (10, True), (11, False)])
    def test_resolve_reads_evidence_after_the_liveness_proof(self, tmp_path: pathlib.Path,
                                                             mutant: int, fails: bool) -> None:
        """Evidence before the liveness proof fails the model; proof, evidence, CAS holds."""
        if shutil.which("spin") is None:
            pytest.skip("spin is not installed (make spin)")
        out = pan(tmp_path, mutant)
        assert ("errors: 0" not in out) == fails, out[-2000:]


@pytest.mark.slow
class TestWrapOntoCommitted:
    @pytest.mark.parametrize("mutant,fails", [(14, True), (12, False)])
    def test_claim_completes_a_committed_record_instead_of_refusing(
            self, tmp_path: pathlib.Path, mutant: int, fails: bool) -> None:
        """The model's claim refuses a committed stopped record (14); resolving it holds (12)."""
        if shutil.which("spin") is None:
            pytest.skip("spin is not installed (make spin)")
        out = pan(tmp_path, mutant)
        assert ("errors: 0" not in out) == fails, out[-2000:]
