"""benchmarks.omp_teams on the real embedded model: every scenario decodes in its own process."""

from __future__ import annotations

from benchmarks.omp_teams import SCENARIOS, compare


def test_every_scenario_reports_a_speed_for_every_round() -> None:
    results = compare(rounds=2, tokens=4, threads=2)
    assert set(results) == set(SCENARIOS)
    for speeds in results.values():
        assert len(speeds) == 2
        assert all(s > 0 for s in speeds)
