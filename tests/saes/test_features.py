"""The Feature type: one string form, one parser, JSON as [layer, latent]."""

import json

import pytest

from refusalscope.saes.features import Feature, feature_strings, features_of


def test_feature_string_form_round_trips():
    f = Feature(17, 1204)
    assert str(f) == "L17/1204" and Feature.parse("L17/1204") == f and Feature.parse(" L17/1204 ") == f
    assert features_of(["L3/4", [3, 4], (3, 4), Feature(3, 4)]) == [Feature(3, 4)] * 4
    assert json.loads(json.dumps([f])) == [[17, 1204]] and Feature.of(json.loads(json.dumps(f))) == f
    assert feature_strings([(1, 2), "L3/4"]) == ["L1/2", "L3/4"]
    assert sorted([Feature(2, 1), Feature(1, 9)]) == [Feature(1, 9), Feature(2, 1)]


@pytest.mark.parametrize("bad", ["17/1204", "L17", "L17/x", "layer 17 latent 3", ""])
def test_feature_parse_rejects_other_forms(bad):
    with pytest.raises(ValueError, match="expected e.g. 'L17/1204'"):
        Feature.parse(bad)
