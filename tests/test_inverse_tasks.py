"""The task presets added for the papers' home ground (issue 15): MRI's exact 4× mask, CT's ill-posedness,
phase retrieval's ambiguities and the alignment every score takes."""

import pytest
import torch

from diffsolve.data import digits
from diffsolve.inverse import measure
from diffsolve.inverse.tasks import CT_ANGLES, TASKS, get_task, mri_mask


@pytest.mark.parametrize("size,seed", [(16, 0), (16, 3), (64, 1)])
def test_mri_mask_has_exactly_a_quarter_of_the_lines(size, seed):
    mask = mri_mask((1, size, size), 4, 0.08, seed)
    cols = mask[0].bool()
    assert torch.equal(mask, cols.double().expand(size, size))  # whole k-space lines (columns)
    assert int(cols.sum()) == size // 4
    center = max(1, round(0.08 * size))
    start = (size - center + 1) // 2
    assert bool(cols[start:start + center].all())  # the centre (DC at index size // 2) is always sampled
    assert not torch.equal(mask, mri_mask((1, size, size), 4, 0.08, seed + 1))


def test_mri4_measures_complex_kspace_of_the_real_image():
    op = get_task("mri4").operator((1, 16, 16))
    assert op.complex_output and not op.complex_input
    x = digits("test")[0][:2].double()
    y = measure(op, x, get_task("mri4").noise(), seed=0)
    assert y.is_complex() and y.shape == (2, 1, 16, 16)
    clean = op.A(x)
    assert bool((clean[..., ~op.mask.bool()] == 0).all()) and float((y - clean).abs().max()) > 0


def test_ct_is_ill_posed_at_the_image_size():
    op = get_task("ct").operator((1, 16, 16))
    assert op.shape_out == (1, CT_ANGLES, 23)
    A = op.matrix.to_dense()
    assert int(torch.linalg.matrix_rank(A)) < 16 * 16 // 2  # a null space of more than half the pixels


def test_phase_retrieval_ambiguities_leave_the_measurement_unchanged():
    task = get_task("phase_retrieval")
    op = task.operator((1, 16, 16))
    x = digits("test")[0][:8].double()
    y = op.A(x)
    candidates = task.ambiguities(x)
    assert len(candidates) == 6
    for c in candidates[::3]:  # the 180° rotation: for every image
        assert torch.allclose(op.A(c), y, atol=1e-12)
    for c in candidates:  # the 1-px horizontal shifts: for these 8, whose first and last columns are blank
        assert torch.allclose(op.A(c), y, atol=1e-12)
    assert float((op.A(x.roll(1, -2)) - y).abs().max()) > 1e-2  # a vertical shift is not an ambiguity


def test_align_picks_the_closest_ambiguity_per_sample():
    task = get_task("phase_retrieval")
    x = digits("test")[0][:4]
    moved = torch.stack([x[0].flip(-2, -1), x[1].roll(1, -1), x[2], x[3].flip(-2, -1).roll(-1, -1)])
    assert torch.equal(task.align(moved, x), x)
    for name, t in TASKS.items():
        if t.ambiguities is None:
            assert task.align is not None and t.align(moved, x) is moved, name
