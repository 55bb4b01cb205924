import numpy as np
import pandas as pd
import pytest

from vlmrel_core.analysis.splits import (
    SplitError,
    SplitSpec,
    assert_group_disjoint,
    calibration_split,
    group_keys,
    grouped_folds,
    holdout_indices,
    image_split,
    item_split,
    make_split,
    range_halves,
)


def _rows(n_images: int = 50, per_image: int = 6, n_items: int = 15, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_images * per_image
    return pd.DataFrame({
        "sample_id": [str(i) for i in range(n)],
        "image_id": np.repeat(np.arange(n_images), per_image),
        "image": [f"images/{i:07d}.png" for i in np.repeat(np.arange(n_images), per_image)],
        "asked_object": [f"obj{k}" for k in rng.integers(0, n_items, n)],
        "correct": (rng.random(n) < 0.7).astype(int),
    })


def test_image_split_keeps_every_image_on_one_side_and_covers_every_row():
    rows = _rows()
    split = image_split(rows, test_fraction=0.3, seed=0)
    train_images = set(rows["image_id"].iloc[split.train])
    test_images = set(rows["image_id"].iloc[split.test])
    assert not train_images & test_images
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(rows)))
    assert 0.2 < split.summary()["realised_test_fraction"] < 0.4
    assert split.summary()["groups"]["test"] == len(test_images)


def test_split_is_deterministic_in_the_seed_and_stratified():
    rows = _rows()
    a, b = image_split(rows, seed=3), image_split(rows, seed=3)
    c = image_split(rows, seed=4)
    assert np.array_equal(a.test, b.test) and np.array_equal(a.train, b.train)
    assert not np.array_equal(a.test, c.test)
    y = rows["correct"].to_numpy()
    assert abs(y[a.train].mean() - y[a.test].mean()) < 0.08


def test_item_split_holds_out_whole_asked_objects():
    rows = _rows()
    split = item_split(rows, test_fraction=0.3, seed=1)
    train_items = set(rows["asked_object"].iloc[split.train])
    test_items = set(rows["asked_object"].iloc[split.test])
    assert test_items and not train_items & test_items


def test_calibration_split_has_three_image_disjoint_parts():
    rows = _rows(n_images=80)
    split = calibration_split(rows, test_fraction=0.2, calibration_fraction=0.2, seed=0)
    parts = [set(rows["image_id"].iloc[idx]) for idx in (split.train, split.calibration, split.test)]
    assert all(parts)
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(split.train) + len(split.calibration) + len(split.test) == len(rows)
    assert 0.1 < len(split.calibration) / len(rows) < 0.3


def test_unstratified_split_uses_group_shuffle_and_stays_grouped():
    rows = _rows()
    groups = group_keys(rows, "image")
    train, test = holdout_indices(rows["correct"], groups, 0.25, seed=0, stratify=False)
    assert not set(groups[train]) & set(groups[test])


def test_clear_errors_for_bad_inputs():
    rows = _rows().drop(columns=["asked_object"])
    with pytest.raises(SplitError, match="asked_object"):
        make_split(rows, SplitSpec("item"))
    with pytest.raises(SplitError, match="test_fraction"):
        SplitSpec("image", test_fraction=1.5)
    with pytest.raises(SplitError, match="at least 2 groups"):
        holdout_indices(np.array([0, 1, 0]), np.array(["a", "a", "a"]), 0.3, 0)
    split = image_split(_rows())
    bad_groups = np.zeros(len(_rows()), dtype=str)  # every row in one group: train and test "share" it
    with pytest.raises(SplitError, match="both train and test"):
        assert_group_disjoint(split, bad_groups)


def test_image_id_ranges_are_disjoint_halves():
    rows = _rows(n_images=10)
    a, b, text = range_halves(rows)
    assert rows["image_id"].iloc[a].max() < rows["image_id"].iloc[b].min()
    assert len(a) == len(b) == 30 and "image_id 0–4 | 5–9" == text


def test_holdout_with_a_rare_class_still_splits_by_group():
    from vlmrel_core.analysis.splits import holdout_indices

    y = np.array([1] * 40 + [0] * 5)
    groups = np.array([f"img{i // 2}" for i in range(45)])
    train, test = holdout_indices(y, groups, test_fraction=0.3, seed=0)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(train) + len(test) == 45 and 0 < len(test) < 45


@pytest.mark.parametrize("grouping", ["image", "item"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_leak_a_group_between_fit_and_validation(grouping, seed):
    """The folds that pick C: no image (or asked object) appears on both sides of any fold, every row is validated
    exactly once, and fit + validation cover all rows."""
    rows = _rows(seed=seed)
    groups = group_keys(rows, grouping)
    y = rows["correct"].to_numpy()
    folds = grouped_folds(y, groups, n_folds=5, seed=seed)
    assert len(folds) == 5
    validated = np.concatenate([va for _, va in folds])
    assert np.array_equal(np.sort(validated), np.arange(len(rows)))
    for fit, validation in folds:
        assert not set(groups[fit]) & set(groups[validation]), f"a {grouping} group is on both sides"
        assert len(fit) + len(validation) == len(rows)
        assert len(set(y[validation])) == 2, "stratification keeps both classes in validation"


def test_grouped_folds_reduce_k_to_the_number_of_groups_and_refuse_one_group():
    rows = _rows(n_images=3, per_image=10)
    groups = group_keys(rows, "image")
    folds = grouped_folds(rows["correct"].to_numpy(), groups, n_folds=5, seed=0)
    assert len(folds) == 3
    for fit, validation in folds:
        assert len(set(groups[validation])) == 1 and not set(groups[fit]) & set(groups[validation])
    with pytest.raises(SplitError, match="at least 2 groups"):
        grouped_folds(np.array([0, 1, 0, 1]), np.array(["a"] * 4), n_folds=5, seed=0)


def test_grouped_folds_are_cached_read_only_and_equal_a_fresh_split():
    from sklearn.model_selection import StratifiedGroupKFold

    from vlmrel_core.analysis import splits as splits_module

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 120)
    groups = np.repeat(np.arange(30), 4).astype(str)
    first = splits_module.grouped_folds(y, groups, 5, 7)
    again = splits_module.grouped_folds(y.copy(), groups.copy(), 5, 7)
    fresh = list(StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=7).split(np.zeros(120), y, groups))
    assert len(first) == len(fresh) == 5
    for (tr, va), (tr2, va2), (tr3, va3) in zip(first, again, fresh):
        np.testing.assert_array_equal(tr, tr3)
        np.testing.assert_array_equal(va, va3)
        assert tr is tr2 and not tr.flags.writeable  # served from the cache, and nobody can edit the cached folds
    other = splits_module.grouped_folds(y, groups, 5, 8)  # another seed: other folds, not the cached ones
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, other))
