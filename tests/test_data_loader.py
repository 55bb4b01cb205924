import json

import pytest
from PIL import Image

from vlmrel_core.data.loader import DatasetError, dataset_hash, load_images, load_vqa_jsonl


@pytest.fixture()
def image_dir(tmp_path):
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    return tmp_path


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_reads_pope_and_generic_keys(image_dir):
    path = _write(image_dir / "d.jsonl", [
        {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "Yes"},
        {"question_id": 2, "image": "a.png", "question": "What colour?", "answer": "red", "question_type": "attribute"},
    ])
    samples = load_vqa_jsonl(path)
    assert [s.label for s in samples] == ["yes", "red"]
    assert samples[1].question == "What colour?"
    assert samples[1].metadata == {"question_type": "attribute"}
    assert samples[0].load_image().size == (8, 8)
    assert len(dataset_hash(path, samples)) == 16


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ({"question_id": 2, "image": "a.png", "label": "no"}, "line 2: missing text/question"),
        ({"question_id": 2, "image": "missing.png", "text": "q?", "label": "no"}, "line 2: image not found"),
        ({"question_id": 1, "image": "a.png", "text": "q?", "label": "no"}, "line 2: duplicate question_id"),
    ],
)
def test_malformed_rows_name_the_line(image_dir, bad_row, message):
    path = _write(image_dir / "d.jsonl", [{"question_id": 1, "image": "a.png", "text": "q?", "label": "yes"}, bad_row])
    with pytest.raises(DatasetError, match=message):
        load_vqa_jsonl(path)


def test_unreadable_image_is_a_clear_error(image_dir):
    (image_dir / "broken.png").write_bytes(b"not a png")
    path = _write(image_dir / "d.jsonl", [{"question_id": 1, "image": "broken.png", "text": "q?", "label": "yes"}])
    with pytest.raises(DatasetError, match="line 1: .*broken.png: not an image"):
        load_vqa_jsonl(path)  # the header is checked up front, before any model work
    sample = load_vqa_jsonl(path, check_images=False)[0]
    with pytest.raises(DatasetError, match="cannot read image"):
        sample.load_image()


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_vqa_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_vqa_jsonl(tmp_path / "empty.jsonl")


def test_load_images_decodes_each_file_once_in_sample_order(image_dir, monkeypatch):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(image_dir / "b.png")
    path = _write(image_dir / "d.jsonl", [
        {"question_id": i, "image": name, "text": "q?", "label": "yes"} for i, name in enumerate(["a.png", "b.png", "a.png", "b.png", "a.png"])
    ])
    samples = load_vqa_jsonl(path)
    opened = []
    import vlmrel_core.data.loader as loader

    real = loader.load_image
    monkeypatch.setattr(loader, "load_image", lambda p: opened.append(p.name) or real(p))
    images = load_images(samples)
    assert sorted(opened) == ["a.png", "b.png"]
    assert [im.getpixel((0, 0)) for im in images] == [(10, 20, 30), (200, 0, 0)] * 2 + [(10, 20, 30)]
    assert images[0] is images[2] is images[4] and images[1] is images[3]
    assert load_images([]) == []
