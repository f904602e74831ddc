import pytest
import torch

from refusalscope.interventions.projection import add_direction, cosine, like, project_out, unit
from refusalscope.direction import cosine_table, kl_divergence, mean_difference


@pytest.fixture
def h():
    torch.manual_seed(0)
    return torch.randn(3, 5, 16)


def test_projection_is_idempotent_and_orthogonal(h):
    r = unit(torch.randn(16))
    once = project_out(h, r)
    assert torch.allclose(project_out(once, r), once, atol=1e-6)
    assert torch.allclose(once @ r, torch.zeros(3, 5), atol=1e-5)
    # only the r component changes: the residual h - h' is parallel to r
    diff = h - once
    assert torch.allclose(diff, (h @ r)[..., None] * r, atol=1e-6)


def test_per_row_projection_matches_rowwise(h):
    rs = unit(torch.randn(3, 16))
    batched = project_out(h, rs)
    for b in range(3):
        assert torch.allclose(batched[b], project_out(h[b:b + 1], rs[b])[0], atol=1e-6)


def test_add_direction_moves_along_r(h):
    r = unit(torch.randn(16))
    out = add_direction(h, r, 2.5)
    assert torch.allclose((out - h) @ r, torch.full((3, 5), 2.5), atol=1e-5)
    per_row = add_direction(h, r, torch.tensor([0.0, 1.0, 2.0]))
    assert torch.allclose(per_row[0], h[0]) and torch.allclose((per_row[2] - h[2]) @ r, torch.full((5,), 2.0))


def test_a_direction_is_converted_once_per_device_and_dtype():
    """Hooks run at every layer and step: the direction is copied to the activations' device/dtype once."""
    r = torch.randn(8)
    get = like(r)
    h32, h16 = torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.bfloat16)
    first = get(h32)
    assert get(h32) is first and torch.equal(first, r)
    assert get(h16) is get(h16) and get(h16).dtype == torch.bfloat16 and get(h32) is first


def test_unit_rejects_zero():
    with pytest.raises(ValueError):
        unit(torch.zeros(4))


def test_mean_difference_layout():
    harmful = torch.zeros(4, 3, 2, 8)
    harmless = torch.zeros(5, 3, 2, 8)
    harmful[:, 1, 0, 2] = 3.0  # layer 1, position index 0, feature 2
    md = mean_difference(harmful, harmless)
    assert md.shape == (2, 3, 8)
    assert md[0, 1, 2] == 3.0 and md.abs().sum() == 3.0


def test_kl_is_zero_for_equal_and_positive_otherwise():
    a = torch.log_softmax(torch.randn(4, 10), -1)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(4), atol=1e-6)
    b = torch.log_softmax(torch.randn(4, 10), -1)
    assert (kl_divergence(a, b) > 0).all()


def test_cosine_table_against_manual():
    torch.manual_seed(1)
    harmful, harmless, r = torch.randn(6, 3, 8), torch.randn(5, 3, 8), torch.randn(8)
    t = cosine_table(harmful, harmless, r)
    row = t[(t.group == "harmful") & (t.layer == 2)].iloc[0]
    manual = torch.stack([torch.dot(x, r) / (x.norm() * r.norm()) for x in harmful[:, 2]])
    assert row.mean_cos == pytest.approx(float(manual.mean()), abs=1e-5)
    assert row.std_cos == pytest.approx(float(manual.std()), abs=1e-5)
    assert cosine(harmful[:, 0], r).shape == (6,)
