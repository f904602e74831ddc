"""The shared test builders' comparisons: what the Ray and hydra tests accept as the same result."""

from helpers import differences_beyond_rounding


def test_rounding_is_accepted_and_any_discrete_change_is_not():
    a = {"k": 10, "jailbroken": True, "features": [[1, 6], [2, 8]], "p": [0.5, 0.0073113424], "text": "x"}
    assert differences_beyond_rounding(a, {**a, "p": [0.5 + 6e-8, 0.0073111734]}) == []
    for changed in ({"k": 20}, {"jailbroken": False}, {"features": [[1, 6], [2, 9]]}, {"features": [[1, 6]]},
                    {"p": [0.5, 0.0074]}, {"text": "y"}, {"extra": 1}):
        assert differences_beyond_rounding(a, {**a, **changed}), changed
    assert differences_beyond_rounding(1, 1.0) == [] and differences_beyond_rounding(True, 1.0)
