"""scripts/rskd_quality.py's --samples arms: M draws, or M@T drawn at proposal temperature T."""
import argparse
import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("rskd_quality", Path(__file__).parents[1] / "scripts" / "rskd_quality.py")
rskd_quality = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(rskd_quality)


def test_sampled_arms_parse_draws_and_proposal_temperature():
    assert rskd_quality._sampled_arms("12,64@2,8@0.5") == [(12, 1.0), (64, 2.0), (8, 0.5)]


@pytest.mark.parametrize("bad", ["twelve", "12@", "12@hot", ""])
def test_sampled_arms_reject_what_is_not_m_or_m_at_t(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="is not M or M@T"):
        rskd_quality._sampled_arms(bad)
