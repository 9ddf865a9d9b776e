"""benchmarks/quality.py --paired: every comparison as a mean difference over seeds with its 95% t interval,
checked against a hand computation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality import comparisons  # noqa: E402


def run(method: str, seed: int, acc: float) -> dict:
    return {"method": method, "config": {"seed": seed}, "by_head": {"ridge": {"ACC": acc}}}


def test_paired_report_by_hand():
    # pm - frozen = 1, 2, 3, 4 points: mean 2.5, se sqrt(5/3) / 2, t(0.975, 3) = 3.182446: [+0.45, +4.55]
    results = [run("frozen", s, 0.5) for s in range(4)] + [
        run("pm", s, 0.5 + (s + 1) / 100) for s in range(4)
    ]
    results += [run("joint", s, 0.52) for s in range(2)]  # only seeds 0 and 1 pair with pm
    table = comparisons(results)
    assert (
        "| pm - frozen (points) | 4 | s0 +1.00, s1 +2.00, s2 +3.00, s3 +4.00 | +2.50 [+0.45, +4.55] |"
        in table
    )
    # pm / joint on seeds 0, 1: 51/52 and 52/52; sd = |r0 - r1| / sqrt 2, se = sd / sqrt 2, t(0.975, 1) = 12.706
    ratios = [100 * 0.51 / 0.52, 100.0]
    m = sum(ratios) / 2
    half = 12.7062047 * abs(ratios[0] - ratios[1]) / 2**0.5 / 2**0.5
    assert (
        f"| pm / joint (%) | 2 | s0 {ratios[0]:.2f}, s1 100.00 | {m:.2f}% [{m - half:.2f}, {m + half:.2f}] |"
        in table
    )
    assert "avg" not in table and "merge" not in table  # nothing to pair: no row
