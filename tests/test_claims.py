from types import SimpleNamespace

from vlmrel_core.analysis.claims import make_claim
from vlmrel_core.analysis.controls import Gain
from vlmrel_core.analysis.metrics import Estimate


def test_claims_need_both_the_row_and_the_group_interval_to_exclude_zero():
    def suites(row, group):
        gain = Gain("probe", "control: item", "item", Estimate((row[0] + row[1]) / 2, *row),
                    Estimate((row[0] + row[1]) / 2, *group))
        return {"item": SimpleNamespace(gains={"probe_vs_item_control": gain, "probe_vs_max_answer_prob": gain})}

    holds = make_claim("m/a", suites((0.01, 0.05), (0.02, 0.04)))
    assert holds.holds and "holds for m/a" in holds.sentence and "both intervals exclude 0" in holds.sentence
    narrow_groups_only = make_claim("m/a", suites((-0.01, 0.05), (0.02, 0.04)))
    assert not narrow_groups_only.holds and "is not established" in narrow_groups_only.sentence
    wide_groups = make_claim("m/a", suites((0.01, 0.05), (-0.03, 0.08)))
    assert not wide_groups.holds
    loss = make_claim("m/a", suites((-0.08, -0.01), (-0.09, -0.02)))
    assert not loss.holds and "item control beats the probe" in loss.sentence
    missing = make_claim("m/a", {})
    assert not missing.holds and "cannot be assessed" in missing.sentence
