"""scripts/codec_ablation.py: every variant's substitutions still match the coder, and the harness
round-trips rows through the shipped coder and a format-changing variant (and says so when ids are not
decoded)."""
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SPEC = importlib.util.spec_from_file_location("codec_ablation",
                                              Path(__file__).parents[1] / "scripts" / "codec_ablation.py")
codec_ablation = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(codec_ablation)


@pytest.mark.parametrize("variant", codec_ablation.VARIANTS, ids=lambda v: v[0])
def test_substitutions_match_the_coder_once(variant):
    name, _, substitutions, _, _ = variant
    source = codec_ablation.SOURCE.read_text()
    out = codec_ablation.patched(source, substitutions, name)
    assert (out == source) == (not substitutions)


def test_a_substitution_that_no_longer_matches_stops_the_run():
    with pytest.raises(SystemExit, match="holds 0 copies"):
        codec_ablation.patched("int main() {}", [("not there", "x")], "broken")


def _cache(rng, lengths=(40, 25)):
    rows = sum(n - 1 for n in lengths)
    idx = np.stack([rng.choice(300, codec_ablation.K, replace=False) for _ in range(rows)]).astype(np.int32)
    logits = rng.normal(size=(rows, 400)) * 3
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return {"idx": idx, "logp": -np.sort(-logp[:, :codec_ablation.K], axis=1).astype(np.float32),
            "input_ids": rng.integers(0, 50, sum(lengths)).astype(np.int32), "lengths": np.array(lengths)}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("variant, round_trip", [("baseline", True), ("static, no bonus, no bits-back", True),
                                                 ("levels only", False)])
def test_harness_round_trips_rows(tmp_path, variant, round_trip):
    rows = codec_ablation.write_rows(tmp_path, _cache(np.random.default_rng(0)))
    index = [v[0] for v in codec_ablation.VARIANTS].index(variant)
    _, _, substitutions, flags, _ = codec_ablation.VARIANTS[index]
    binary = codec_ablation.build(tmp_path, index, variant, substitutions, flags)
    result = json.loads(subprocess.run([str(binary), str(tmp_path), "1"], capture_output=True, text=True,
                                       check=True).stdout)
    assert result["rows"] == rows == 63
    assert result["round_trip"] is round_trip  # levels only: ids not coded, so not decoded either
    assert result["body_bytes"] > 0
