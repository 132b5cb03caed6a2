import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import BundleError, ConfigError
from edge.manifest import FORMAT_VERSION, Manifest, TensorEntry
from edge.schema import from_dict, to_dict


def _manifest_dict(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_manifest_round_trips(tiny_bundle):
    d = _manifest_dict(tiny_bundle("llama"))
    m = Manifest.from_json(json.dumps(d))
    assert json.loads(m.to_json()) == d


def test_unknown_and_missing_fields_are_named(tiny_bundle):
    d = _manifest_dict(tiny_bundle("llama"))
    d["model"]["surprise"] = 1
    with pytest.raises(BundleError, match="surprise"):
        Manifest.from_json(json.dumps(d))
    d = _manifest_dict(tiny_bundle("llama"))
    del d["graph"]["logits"]
    with pytest.raises(BundleError, match="logits"):
        Manifest.from_json(json.dumps(d))


@pytest.mark.parametrize("version,words", [(FORMAT_VERSION + 1, "newer"), (0, "older")])
def test_format_version_is_checked_first(version, words):
    with pytest.raises(BundleError, match=words):
        Manifest.from_json(json.dumps({"format_version": version, "anything": "else"}))


def test_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match="shape"):
        from_dict(TensorEntry, {"name": "w", "shape": "3x4", "dtype": "int4"})
    with pytest.raises(ConfigError, match="block_size"):
        from_dict(TensorEntry, {"name": "w", "shape": [3], "dtype": "int4", "block_size": True})


entries = st.builds(TensorEntry, name=st.text(min_size=1, max_size=20), shape=st.lists(st.integers(1, 10**6), max_size=4).map(tuple),
                    dtype=st.sampled_from(["float32", "int8", "int4"]), method=st.sampled_from(["none", "rtn"]),
                    block_size=st.sampled_from([0, 32, 64]), symmetric=st.booleans(),
                    max_rel_err=st.floats(0, 1), rms_rel_err=st.floats(0, 1))


@settings(max_examples=200, deadline=None)
@given(entries)
def test_tensor_entry_round_trip(e):
    assert from_dict(TensorEntry, json.loads(json.dumps(to_dict(e)))) == e


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=20))
def test_arbitrary_json_never_crashes_the_parser(value):
    """Whatever JSON a manifest holds, the parser either accepts it or raises BundleError."""
    try:
        Manifest.from_json(json.dumps(value))
    except BundleError:
        pass
