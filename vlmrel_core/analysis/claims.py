"""The sentence a report stands on: does "the hidden state know more than the output" hold for a run?

Why its own rule: the claim is decided on held-out *items* only, and only when both paired 95% intervals (over test
rows and over whole items) exclude 0; every other comparison is reported alongside, never as the deciding number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmrel_core.analysis.controls import ControlSuite, Gain

#: Below this many held-out items the claim says that its group interval is coarse.
MIN_HELD_OUT_ITEMS = 10


@dataclass
class Claim:
    """Whether "the hidden state knows more than the output" holds for one run, and the sentence that says so."""

    run: str
    holds: bool
    sentence: str
    gain_over_item_control: Gain | None
    gain_over_max_prob: Gain | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "holds": self.holds, "sentence": self.sentence,
            "gain_over_item_control": None if self.gain_over_item_control is None else self.gain_over_item_control.to_dict(),
            "gain_over_max_prob": None if self.gain_over_max_prob is None else self.gain_over_max_prob.to_dict(),
        }



def make_claim(run: str, controls: dict[str, ControlSuite]) -> Claim:
    """The sentence about "the hidden state knows more than the output", decided on held-out items only.

    It holds only if both paired 95% CIs of AUROC(probe) − AUROC(item control) on the held-out-items split (over
    test rows, and over whole held-out items) lie above 0 (`Gain.conservative`). The held-out-images result and the
    gain over max-prob (both as the union of the two intervals) are reported alongside, never as the deciding number.
    """
    item = controls.get("item")
    image = controls.get("image")
    mp_suite = item or image
    gain_mp = mp_suite.gains.get("probe_vs_max_answer_prob") if mp_suite else None
    if item is None:
        sentence = (f'"The hidden state knows more than the output" cannot be assessed for {run}: '
                    "no held-out-items split (the rows need an asked_object column).")
        return Claim(run, False, sentence, None, gain_mp)
    gain = item.gains["probe_vs_item_control"]
    g, rows_ci, groups_ci = gain.conservative, gain.row_paired, gain.group_paired
    split = getattr(item, "split", None)
    n_items = split.group_counts.get("test") if split is not None else None
    over = f"over {n_items} held-out items" if n_items else "over held-out items"
    numbers = (f"{g.value:+.3f} (paired 95% CI over test rows [{rows_ci.low:+.3f}, {rows_ci.high:+.3f}], "
               f"{over} [{groups_ci.low:+.3f}, {groups_ci.high:+.3f}])")
    if g.low > 0:
        sentence = (f'"The hidden state knows more than the output" holds for {run}: on held-out items the probe '
                    f"beats the item control by {numbers}; both intervals exclude 0.")
    elif g.high < 0:
        sentence = (f'"The hidden state knows more than the output" does not hold for {run}: on held-out items the '
                    f"item control beats the probe; probe − item control = {numbers}.")
    else:
        sentence = (f'"The hidden state knows more than the output" is not established for {run}: on held-out '
                    f"items probe − item control = {numbers}; an interval includes 0.")
    if n_items is not None and n_items < MIN_HELD_OUT_ITEMS:
        sentence += (f" Only {n_items} items are held out, so the interval over items is coarse; a dataset with more asked objects "
                     "would sharpen it.")
    if image is not None:
        gi = image.gains["probe_vs_item_control"].conservative
        sentence += (f" On held-out images (where the item control may learn per-item difficulty) the difference is "
                     f"{gi.value:+.3f} [{gi.low:+.3f}, {gi.high:+.3f}].")
    if gain_mp is not None:
        gm = gain_mp.conservative
        sentence += f" Probe − max answer probability on held-out items: {gm.value:+.3f} [{gm.low:+.3f}, {gm.high:+.3f}]."
    return Claim(run, bool(g.low > 0), sentence, gain, gain_mp)
