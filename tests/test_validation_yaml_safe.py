"""validation.yaml_safe: anchors/aliases, duplicate keys, size cap, short excerpts; Hypothesis: only InputError."""

import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmrel_core.validation.errors import InputError
from vlmrel_core.validation.yaml_safe import load_yaml_file, load_yaml_text


def test_plain_yaml_loads():
    assert load_yaml_text("a: 1\nb: [x, y]\n") == {"a": 1, "b": ["x", "y"]}


@pytest.mark.parametrize("text, message", [
    ("a: &x 1\nb: *x\n", "anchors"),
    ("b: *x\n", "aliases|not valid YAML"),
    ("a: 1\na: 2\n", "duplicate YAML key 'a' on line 2 \\(first on line 1\\)"),
    ("a: [1, 2\n", "not valid YAML"),
    ("a: !!python/object/apply:os.system ['id']\n", "not valid YAML"),
    ("[" * 5000 + "]" * 5000, "nested too deeply|not valid YAML"),
])
def test_refusals(text, message):
    with pytest.raises(InputError, match=message):
        load_yaml_text(text, "cfg.yaml")


def test_billion_laughs_is_refused_at_once():
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    start = time.perf_counter()
    with pytest.raises(InputError, match="anchors") as err:
        load_yaml_text("\n".join(lines))
    assert time.perf_counter() - start < 1.0 and len(str(err.value)) < 200


def test_size_cap_and_encoding(tmp_path):
    with pytest.raises(InputError, match="over the 100-byte limit"):
        load_yaml_text("a: " + "x" * 200, max_bytes=100)
    (tmp_path / "bin.yaml").write_bytes(b"a: \xff\xfe")
    with pytest.raises(InputError, match="bin.yaml is not UTF-8"):
        load_yaml_file(tmp_path / "bin.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfa: 1\n")
    assert load_yaml_file(tmp_path / "bom.yaml") == {"a": 1}


def test_error_quotes_only_a_short_excerpt():
    with pytest.raises(InputError) as err:
        load_yaml_text("key: [" + "x" * 100_000)
    assert len(str(err.value)) < 300


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_accepted_or_refused_with_input_error(text):
    start = time.perf_counter()
    try:
        load_yaml_text(text)
    except InputError:
        pass
    assert time.perf_counter() - start < 2.0


@settings(max_examples=100, deadline=None)
@given(yaml_values)
def test_documents_without_anchors_round_trip(value):
    assert load_yaml_text(yaml.safe_dump(value)) == value
