"""Aggregation modes: hand values, a Python-loop reference, accumulation and padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.aggregation import (
    AGG_MODES,
    aggregate,
    masked_mean,
    sequence_count,
    token_count,
)

NAN = float("nan")


def _kwargs(mode, const_len=5):
    return {"const_len": const_len} if mode == "seq_sum_const" else {}


def test_hand_values_every_mode():
    """loss rows [1,2,3,|4], [10,|20,0,0], [|nan x4]  (| = mask ends; row 3 fully masked).

    Masked tokens: 1,2,3 (|y|=3) and 10 (|y|=1); the empty row is not a sequence.
      token_mean          = (1+2+3+10) / 4                    = 4
      seq_mean_token_mean = (6/3 + 10/1) / 2                  = 6
      seq_sum_const (L=4) = 16 / (4 * 2)                      = 2
      seq_mean_token_sum  = 16 / 2                            = 8
    The NaNs sit under a zero mask and must not leak.
    """
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 0.0, 0.0], [NAN] * 4])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    expected = {"token_mean": 4.0, "seq_mean_token_mean": 6.0, "seq_sum_const": 2.0, "seq_mean_token_sum": 8.0}
    for mode, value in expected.items():
        got = aggregate(loss, mask, mode, **_kwargs(mode, const_len=4))
        assert got.item() == pytest.approx(value, abs=1e-6), mode
    assert token_count(mask) == 4 and sequence_count(mask) == 2


def _loop_reference(loss, mask, mode, const_len):
    """Scalar Python loops, independent of the vectorised code."""
    total, n_tok, n_seq, seq_means = 0.0, 0, 0, 0.0
    for i in range(len(loss)):
        row_sum, row_len = 0.0, 0
        for t in range(len(loss[i])):
            if mask[i][t]:
                row_sum += float(loss[i][t])
                row_len += 1
        total += row_sum
        n_tok += row_len
        if row_len > 0:
            n_seq += 1
            seq_means += row_sum / row_len
    if mode == "token_mean":
        return total / n_tok
    if mode == "seq_mean_token_mean":
        return seq_means / n_seq
    if mode == "seq_sum_const":
        return total / (const_len * n_seq)
    return total / n_seq


@pytest.mark.parametrize("mode", AGG_MODES)
def test_matches_python_loop(mode):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    lengths = [9, 1, 0, 4, 7, 2]
    mask = torch.zeros(6, 9, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    got = aggregate(loss, mask, mode, **_kwargs(mode, const_len=12)).item()
    assert got == pytest.approx(_loop_reference(loss.tolist(), mask.tolist(), mode, 12), abs=1e-12)


def _batch(seed=1):
    """8 sequences of different lengths (one fully masked), shared parameter w so that gradients
    from different micro-batches accumulate into one tensor, as with a model."""
    gen = torch.Generator().manual_seed(seed)
    x_BTD = torch.randn(8, 7, 3, generator=gen, dtype=torch.float64)
    lengths = [7, 1, 3, 0, 5, 2, 6, 4]
    mask_BT = torch.zeros(8, 7, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask_BT[i, :n] = True
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    return x_BTD, mask_BT, w


def _per_token_loss(x_BTD, w):
    return torch.tanh(x_BTD @ w) ** 2 + 0.3 * (x_BTD @ w)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_accumulation_1x8_equals_8x1(mode):
    """Summing aggregate() over 8 micro-batches of one sequence, each given the GLOBAL counts,
    equals one aggregate() over the 8-sequence batch, in value and in gradient."""
    x, mask, w0 = _batch()
    kw = _kwargs(mode, const_len=7)

    w_full = w0.clone().requires_grad_(True)
    full = aggregate(_per_token_loss(x, w_full), mask, mode, **kw)
    full.backward()

    global_counts = {"num_tokens": token_count(mask)} if mode == "token_mean" else {"num_seqs": sequence_count(mask)}
    w_acc = w0.clone().requires_grad_(True)
    acc = torch.zeros((), dtype=torch.float64)
    for i in range(8):
        micro = aggregate(_per_token_loss(x[i : i + 1], w_acc), mask[i : i + 1], mode, **global_counts, **kw)
        micro.backward()  # gradients accumulate in w_acc.grad, as in a real accumulation loop
        acc = acc + micro.detach()

    assert acc.item() == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(w_acc.grad, w_full.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_local_counts_break_accumulation(mode):
    """Control: averaging per-micro-batch LOCAL aggregates (the bug global counts prevent) gives
    a different value on this data, so the invariance test above is not vacuous."""
    x, mask, w = _batch()
    full = aggregate(_per_token_loss(x, w), mask, mode).item()
    halves = [aggregate(_per_token_loss(x[s], w), mask[s], mode).item() for s in (slice(0, 2), slice(2, 8))]
    assert abs(sum(halves) / 2 - full) > 1e-3


@pytest.mark.parametrize("mode", AGG_MODES)
def test_padding_amount_and_side_do_not_matter(mode):
    """Extra masked columns (garbage values, left or right) change neither value nor gradient."""
    x, mask, w0 = _batch(seed=2)
    kw = _kwargs(mode, const_len=7)

    def run(x_, mask_):
        w = w0.clone().requires_grad_(True)
        out = aggregate(_per_token_loss(x_, w), mask_, mode, **kw)
        out.backward()
        return out.item(), w.grad

    base_val, base_grad = run(x, mask)
    junk = torch.full((8, 3, 3), 1e3, dtype=torch.float64)
    no_mask = torch.zeros(8, 3, dtype=torch.bool)
    for x_pad, m_pad in [
        (torch.cat([x, junk], 1), torch.cat([mask, no_mask], 1)),
        (torch.cat([junk, x], 1), torch.cat([no_mask, mask], 1)),
    ]:
        val, grad = run(x_pad, m_pad)
        assert val == pytest.approx(base_val, abs=1e-12)
        torch.testing.assert_close(grad, base_grad, atol=1e-12, rtol=0)


def test_all_masked_batch_gives_zero_not_nan():
    loss = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    for mode in AGG_MODES:
        out = aggregate(loss, mask, mode, **_kwargs(mode))
        out.backward()
        assert out.item() == 0.0 and torch.isfinite(loss.grad).all()


def test_argument_validation():
    loss, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="const_len"):
        aggregate(loss, mask, "seq_sum_const")
    with pytest.raises(ValueError, match="const_len"):
        aggregate(loss, mask, "token_mean", const_len=5)
    with pytest.raises(ValueError, match="num_seqs"):
        aggregate(loss, mask, "token_mean", num_seqs=2)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(loss, mask, "seq_mean_token_mean", num_tokens=6)
    with pytest.raises(ValueError, match="unknown"):
        aggregate(loss, mask, "sum")
    with pytest.raises(ValueError, match="shape|both"):
        aggregate(loss, mask[:1], "token_mean")


def test_global_count_as_tensor_is_accepted():
    """Under torch.distributed the count arrives as an all-reduced tensor."""
    loss = torch.tensor([[2.0, 4.0]])
    out = aggregate(loss, torch.ones(1, 2), "token_mean", num_tokens=torch.tensor(4))
    assert out.item() == pytest.approx(1.5)


def test_half_precision_loss_reduces_in_fp32():
    """bf16 cannot represent 100001 (it rounds to 99840 or 100352), so a bf16 denominator would
    be off by ~0.2%; the result must match the fp32 computation and come back as fp32."""
    loss = torch.full((1, 4), 2.0, dtype=torch.bfloat16, requires_grad=True)
    out = aggregate(loss, torch.ones(1, 4), "token_mean", num_tokens=100001)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(8.0 / 100001, rel=1e-6)
    out.backward()
    assert loss.grad.dtype == torch.bfloat16


def test_masked_mean():
    """mean of {1, 3} = 2 overall; per row: row 0 -> 1, row 1 -> 3, row 2 empty -> 0 (not NaN)."""
    x = torch.tensor([[1.0, NAN], [NAN, 3.0], [NAN, NAN]])
    mask = torch.tensor([[True, False], [False, True], [False, False]])
    assert masked_mean(x, mask).item() == 2.0
    assert masked_mean(x, mask, dim=-1).tolist() == [1.0, 3.0, 0.0]
    flags = torch.tensor([[True, False], [True, True]])
    assert masked_mean(flags, torch.ones(2, 2)).item() == pytest.approx(0.75)
    assert not math.isnan(masked_mean(x, torch.zeros(3, 2)).item())
