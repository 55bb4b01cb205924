import json

from vlmrel_core.data.shapes import (
    OBJECTS,
    iter_split_questions,
    make_scene,
    popularity_ranking,
    render_scene,
    write_split,
)


def test_scenes_and_images_are_deterministic():
    a, b = make_scene(42), make_scene(42)
    assert a == b
    assert render_scene(a).tobytes() == render_scene(b).tobytes()
    assert make_scene(43) != a


def test_pope_pairs_are_balanced_and_labels_true():
    rows = [q for _, q in iter_split_questions("random", 50)]
    assert sum(q.label == "yes" for q in rows) == sum(q.label == "no" for q in rows) == 50
    for q in rows:
        assert (q.asked_object in q.objects) == (q.label == "yes")
        assert q.asked_object in OBJECTS


def test_adversarial_negatives_share_colour_or_shape_with_a_present_object():
    for _, q in iter_split_questions("adversarial", 80):
        if q.label == "no":
            colour, shape = q.asked_object.split()
            assert any(o.startswith(colour + " ") or o.endswith(" " + shape) for o in q.objects), q


def test_popular_negatives_come_from_the_most_frequent_objects():
    ranking = popularity_ranking()
    for _, q in iter_split_questions("popular", 60):
        if q.label == "no":
            present = set(q.objects)
            top = [o for o in ranking if o not in present][:3]
            assert q.asked_object in top


def test_open_questions_have_true_answers():
    for scene, q in iter_split_questions("adversarial", 40, question_types=("attribute", "count")):
        if q.question_type == "attribute":
            matches = [o.colour for o in scene.objects if o.shape == q.asked_object]
            assert matches == [q.label]
        else:
            number = ["zero", "one", "two", "three", "four"].index(q.label)
            assert number == sum(o.shape == q.asked_object for o in scene.objects)


def test_write_split_writes_pope_jsonl_and_images(tmp_path):
    path = write_split(tmp_path, "adversarial", n_images=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 10
    for row in rows:
        assert {"question_id", "image", "text", "label"} <= row.keys()
        assert (tmp_path / row["image"]).is_file()
    again = write_split(tmp_path / "again", "adversarial", n_images=5)
    assert again.read_text() == path.read_text()
