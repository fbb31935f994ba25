"""alignkit.maths: hand-worked tensors, naive-loop oracles and properties."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.maths import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

T_, F_ = True, False


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def m(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ---- masked statistics --------------------------------------------------------------------------------


def test_masked_mean_hand_worked():
    x = t([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]])
    mask = m([[T_, T_, F_], [T_, F_, T_]])
    assert masked_mean(x, mask).item() == pytest.approx(13 / 4)  # inf and nan at masked positions ignored
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 5.0])
    assert masked_mean(x, mask, dim=0).tolist() == pytest.approx([2.5, 2.0, 6.0])
    assert math.isnan(masked_mean(x, m([[F_] * 3] * 2)).item())  # nothing to average: NaN, not 0


def test_masked_mean_rejects_float_mask_and_shape_mismatch():
    with pytest.raises(TypeError, match="bool"):
        masked_mean(t([1.0]), t([1.0]))
    with pytest.raises(ValueError, match="shape"):
        masked_mean(t([1.0, 2.0]), m([T_]))


def test_masked_var_hand_worked():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, -7.0]])
    mask = m([[T_, T_, F_], [T_, T_, F_]])
    # 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(5 / 4)
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, m([[T_, F_, F_], [F_, F_, F_]]))


def test_masked_whiten_gives_mean_0_var_1_on_masked_entries():
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(6, 9, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=gen) < 0.6
    out = masked_whiten(x, mask)
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert masked_var(out, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert (out[~mask] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)  # rescaled only: mean stays, var 1
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item())
    assert masked_var(kept, mask).item() == pytest.approx(1.0, abs=1e-6)


# ---- GAE ----------------------------------------------------------------------------------------------


def naive_gae(rewards, values, mask, gamma, lam):
    """Per-sequence Python loop over the masked-in positions only (the documented convention)."""
    adv = torch.zeros_like(values)
    for b in range(values.shape[0]):
        idx = [i for i in range(values.shape[1]) if mask[b, i]]
        running = 0.0
        for k in reversed(range(len(idx))):
            nxt = values[b, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[b, idx[k]].item() + gamma * nxt - values[b, idx[k]].item()
            running = delta + gamma * lam * running
            adv[b, idx[k]] = running
    return adv, torch.where(mask, adv + values, torch.zeros_like(values))


def test_gae_hand_worked_three_tokens():
    gamma, lam = 0.9, 0.5
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0], [0.0, 5.0, 1.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, 42.0], [0.5, 9.0, 0.7]])
    mask = m([[T_, T_, T_], [T_, T_, F_], [T_, F_, T_]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3]
    #        A2 = 0.3; A1 = 0.03 + 0.45*0.3 = 0.165; A0 = 0.04 + 0.45*0.165 = 0.11425
    # row 1 (right-padded): last valid token is terminal: A1 = 1 - 0.6 = 0.4; A0 = 0.04 + 0.45*0.4 = 0.22
    # row 2 (hole at t=1, skipped): A2 = 0.3; A0 = 0.9*0.7 - 0.5 + 0.45*0.3 = 0.265
    expected_adv = t([[0.11425, 0.165, 0.3], [0.22, 0.4, 0.0], [0.265, 0.0, 0.3]])
    torch.testing.assert_close(adv, expected_adv)
    torch.testing.assert_close(ret, t([[0.61425, 0.765, 1.0], [0.72, 1.0, 0.0], [0.765, 0.0, 1.0]]))


def test_gae_matches_naive_loop():
    gen = torch.Generator().manual_seed(1)
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 0.7)]:
        rewards = torch.randn(7, 11, generator=gen, dtype=torch.float64)
        values = torch.randn(7, 11, generator=gen, dtype=torch.float64)
        mask = torch.rand(7, 11, generator=gen) < 0.7  # holes, leading and trailing padding
        mask[0] = False  # a sequence with no tokens
        mask[1] = True
        adv, ret = gae(rewards, values, mask, gamma, lam)
        want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret, want_ret)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards, values = t([[0.1, -0.2, 0.3, 1.0]]), t([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = gae(rewards, values, m([[T_] * 4]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, t([[1.2, 1.1, 1.3, 1.0]]))  # returns = undiscounted reward-to-go
    torch.testing.assert_close(adv, ret - values)


# ---- KL -----------------------------------------------------------------------------------------------


def test_kl_estimates_hand_worked():
    logps, ref = t([math.log(0.5)]), t([math.log(0.25)])  # log r = log(0.25 / 0.5) = -log 2
    ln2 = math.log(2)
    assert kl_estimate(logps, ref, "k1").item() == pytest.approx(ln2)
    assert kl_estimate(logps, ref, "k2").item() == pytest.approx(0.5 * ln2**2)
    assert kl_estimate(logps, ref, "k3").item() == pytest.approx(0.5 - 1 + ln2)
    assert kl_estimate(logps, ref, "k1", log_ratio_clamp=0.5).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logps, ref, "k4")


def test_k3_nonnegative_and_k1_k3_unbiased():
    gen = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)  # sampled from the policy p
    logps, ref_logps = p.log()[tokens], q.log()[tokens]
    k3 = kl_estimate(logps, ref_logps, "k3")
    assert (k3 >= 0).all()
    assert kl_estimate(logps, ref_logps, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (kl_estimate(logps, ref_logps, "k2") >= 0).all()


def test_adaptive_kl_moves_toward_target():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=1000)  # error 1.0 clipped to 0.2: x (1 + 0.2 * 0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=4.5, n_steps=1000)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(0.102 * 0.98)
    before = ctl.value
    ctl.update(current_kl=6.6, n_steps=500)  # error 0.1 -> x (1 + 0.1 * 0.05)
    assert ctl.value == pytest.approx(before * 1.005)
    ctl.update(current_kl=6.0, n_steps=500)  # on target: unchanged
    assert ctl.value == pytest.approx(before * 1.005)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(current_kl=0.0, n_steps=50_000)  # would push the multiplier to 0


def test_fixed_kl_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10)
    assert ctl.value == 0.05


# ---- loss reduction -----------------------------------------------------------------------------------


def test_aggregate_loss_hand_worked():
    loss = t([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0], [7.0, 8.0, 9.0]])
    mask = m([[T_, T_, T_], [T_, F_, F_], [F_, F_, F_]])  # the last sequence has no tokens
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-sum"):
        aggregate_loss(loss, mask, "sum")


def test_token_mean_with_global_normalizer_is_invariant_to_sharding():
    gen = torch.Generator().manual_seed(3)
    loss = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    mask = torch.rand(8, 5, generator=gen) < 0.6
    full = aggregate_loss(loss, mask, "token-mean")
    n_tokens = mask.sum()
    for cuts in ([0, 3, 8], [0, 1, 2, 7, 8], [0, 4, 8]):
        shards = zip(cuts[:-1], cuts[1:])
        total = sum(
            aggregate_loss(loss[a:b], mask[a:b], "token-mean", normalizer=n_tokens)
            for a, b in shards
        )
        torch.testing.assert_close(total, full)


# ---- PPO losses ---------------------------------------------------------------------------------------


def test_ppo_policy_loss_hand_worked_table():
    # ratio, advantage -> per-token loss with clip_eps 0.2
    #  1.5, +1 -> max(-1.5, -1.2) = -1.2 (clipped)   0.5, +1 -> max(-0.5, -0.8) = -0.5
    #  1.5, -1 -> max( 1.5,  1.2) =  1.5             0.5, -1 -> max( 0.5,  0.8) =  0.8 (clipped)
    #  1.0, +2 -> -2                                 (masked token: ratio 9, advantage 100, ignored)
    ratio = t([[1.5, 0.5, 1.5], [0.5, 1.0, 9.0]])
    adv = t([[1.0, 1.0, -1.0], [-1.0, 2.0, 100.0]])
    mask = m([[T_, T_, T_], [T_, T_, F_]])
    old = t([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    logps = (old + ratio.log()).requires_grad_()
    loss, stats = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.0) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    assert stats["ratio_mean"].item() == pytest.approx(5.0 / 5)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.0)]
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 5)
    loss.backward()
    # d(-A * ratio)/d logp = -A * ratio / 5 where unclipped; 0 where the clipped term wins or masked
    torch.testing.assert_close(logps.grad, t([[0.0, -0.1, 0.3], [0.0, -0.4, 0.0]]))


def test_ppo_policy_loss_on_policy_is_minus_mean_advantage():
    gen = torch.Generator().manual_seed(4)
    logps = torch.randn(3, 4, generator=gen)
    adv = torch.randn(3, 4, generator=gen)
    mask = torch.rand(3, 4, generator=gen) < 0.8
    mask[0, 0] = True
    loss, stats = ppo_policy_loss(logps, logps.clone(), adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, -masked_mean(adv, mask))
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_ppo_value_loss_hand_worked():
    # clip_eps 0.5, old values 0:
    #  V  1.0, R  1.0: (0)^2 vs (0.5 - 1)^2 = 0.25 -> 0.125 (clipped)
    #  V  0.2, R  1.0: 0.64 both (inside the clip range) -> 0.32
    #  V  1.0, R  0.0: 1 vs 0.25 -> 0.5
    #  V -1.0, R -0.2: 0.64 vs (-0.5 + 0.2)^2 = 0.09 -> 0.32
    values = t([[1.0, 0.2, 1.0, -1.0, 7.0]])
    returns = t([[1.0, 1.0, 0.0, -0.2, 0.0]])
    mask = m([[T_, T_, T_, T_, F_]])
    loss, stats = ppo_value_loss(values, torch.zeros_like(values), returns, mask, clip_eps=0.5)
    assert loss.item() == pytest.approx((0.125 + 0.32 + 0.5 + 0.32) / 4)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)


# ---- entropy and explained variance -------------------------------------------------------------------


def test_entropy_matches_naive_and_is_chunk_invariant():
    gen = torch.Generator().manual_seed(5)
    logits = 4 * torch.randn(3, 5, 17, generator=gen)
    naive = torch.distributions.Categorical(logits=logits).entropy()
    for chunk_rows in (1, 4, 15, 1000):
        torch.testing.assert_close(entropy_from_logits(logits, chunk_rows=chunk_rows), naive)
    uniform = torch.zeros(2, 3, 10, dtype=torch.bfloat16)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(10)))


def test_entropy_matches_trl_oracle():
    """TRL 1.16's trl.trainer.utils.entropy_from_logits (its CPU path; on CUDA it dispatches to a Triton kernel)."""
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    gen = torch.Generator().manual_seed(6)
    shapes = [(17,), (3, 5, 17), (2, 7, 1), (4, 1000), (1, 1, 32_000), (0, 5), (2, 0, 9)]
    for dtype in (torch.float32, torch.float64):
        for shape in shapes:
            for scale in (0.01, 1.0, 4.0, 30.0, 1e4):  # near-uniform to one-hot
                logits = scale * torch.randn(*shape, generator=gen, dtype=dtype)
                want = trl_entropy(logits, chunk_size=7)
                for chunk_rows in (1, 1024):
                    got = entropy_from_logits(logits, chunk_rows=chunk_rows)
                    assert got.dtype == dtype and got.shape == want.shape
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        uniform = torch.zeros(2, 3, 10, dtype=dtype)  # all logits equal: log V
        torch.testing.assert_close(entropy_from_logits(uniform), trl_entropy(uniform), rtol=0, atol=1e-6)
    # bf16 logits are upcast per chunk: TRL's CPU path on the same values in float32
    bf16 = (4 * torch.randn(3, 5, 300, generator=gen)).to(torch.bfloat16)
    torch.testing.assert_close(entropy_from_logits(bf16), trl_entropy(bf16.float()), rtol=0, atol=1e-6)


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, 100.0]])
    mask = m([[T_, T_, T_, F_]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)
    # V = (1, 2, 2): residuals (0, 0, 1): var 2/9; Var[R] = 2/3 -> 1 - 1/3
    assert explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), returns, mask).item() == pytest.approx(2 / 3)
