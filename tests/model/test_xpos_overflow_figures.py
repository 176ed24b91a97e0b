"""The README's xPos overflow positions are where the unframed scales ζ^(±n/base) really overflow."""

import math
import re
from pathlib import Path

import torch

from retnet.model.modeling_retnet import XPOS_MIN_ZETA

README = Path(__file__).resolve().parents[2] / "README.md"


def _first_overflow(dtype: torch.dtype, base: float = 512.0) -> int:
    # k is scaled by ζ^(−n/base), the larger of the two; the smallest ζ grows fastest
    n = torch.arange(0, 60_000, dtype=torch.float64)
    inverse = torch.exp(-n / base * math.log(XPOS_MIN_ZETA)).to(dtype)
    return int(n[torch.isinf(inverse)][0])


def test_readme_xpos_overflow_positions():
    text = " ".join(README.read_text().split())
    match = re.search(r"fp32 from n ≈ ([\d ]+) with `xpos_scale_base=512`, fp16 from ≈ ([\d ]+)", text)
    assert match, "the README's xPos paragraph no longer states the overflow positions"
    fp32, fp16 = (int(group.replace(" ", "")) for group in match.groups())
    # the README rounds to tens
    assert abs(fp32 - _first_overflow(torch.float32)) <= 10
    assert abs(fp16 - _first_overflow(torch.float16)) <= 10
