"""The sample schedule every rank derives on its own must partition each step exactly."""

import pytest
import torch

from poft_ds.data.schedule import Schedule, pack_positions, reference_positions, shared_positions


@pytest.mark.parametrize(
    ("trainers", "micro", "global_batch", "ref_ranks"), [(1, 2, 8, 1), (2, 2, 8, 2), (4, 1, 12, 3)]
)
def test_positions_are_partitioned_between_trainers_and_reference_ranks(trainers, micro, global_batch, ref_ranks):
    s = Schedule(tuple(range(50)), seed=3, global_batch=global_batch, micro_batch=micro, trainers=trainers, epochs=2)
    by_trainer = [s.trainer_positions(t, step=0) for t in range(trainers)]
    assert sorted(p for ps in by_trainer for p in ps) == list(range(global_batch))
    by_ref = [reference_positions(global_batch, ref_ranks, j) for j in range(ref_ranks)]
    assert sorted(p for ps in by_ref for p in ps) == list(range(global_batch))
    for t in range(trainers):
        received = sorted(p for j in range(ref_ranks) for p in shared_positions(s, 0, t, ref_ranks, j))
        assert received == by_trainer[t]


def test_epochs_are_seeded_permutations_and_leftovers_are_counted():
    s = Schedule(tuple(range(10, 60)), seed=5, global_batch=8, micro_batch=2, trainers=2, epochs=2)
    assert (s.steps_per_epoch, s.leftover_per_epoch, s.total_steps) == (6, 2, 12)
    epoch0 = [i for step in range(6) for i in s.global_batch_at(step)]
    epoch1 = [i for step in range(6, 12) for i in s.global_batch_at(step)]
    assert len(set(epoch0)) == 48 and set(epoch0) <= set(range(10, 60))
    assert epoch0 != epoch1  # each epoch reshuffles
    again = Schedule(tuple(range(10, 60)), seed=5, global_batch=8, micro_batch=2, trainers=2, epochs=2)
    assert [again.global_batch_at(k) for k in range(12)] == [s.global_batch_at(k) for k in range(12)]
    assert Schedule(s.usable, 5, 8, 2, 2, 2, max_steps=4).total_steps == 4


def test_max_steps_overrides_epochs_and_cycles_through_the_data():
    # 50 usable rows, global batch 8: 6 steps an epoch (2 rows left over each epoch).
    s = Schedule(tuple(range(50)), seed=5, global_batch=8, micro_batch=2, trainers=2, epochs=1, max_steps=20)
    assert s.total_steps == 20 and s.total_epochs == pytest.approx(20 / 6)
    assert [s.epoch_of(k) for k in (0, 5, 6, 12, 18, 19)] == [0, 0, 1, 2, 3, 3]
    for epoch in range(3):  # each full epoch is a fresh permutation of 48 distinct rows
        rows = [i for k in range(6 * epoch, 6 * epoch + 6) for i in s.global_batch_at(k)]
        assert len(set(rows)) == 48
    assert s.global_batch_at(6) != s.global_batch_at(0)
    # Fewer steps than the epochs give still stops at max_steps.
    assert Schedule(s.usable, 5, 8, 2, 2, epochs=3, max_steps=4).total_steps == 4


def test_length_grouping_keeps_each_step_and_balances_trainers():
    lengths = tuple((i * 37) % 101 for i in range(64))
    plain = Schedule(tuple(range(64)), seed=2, global_batch=16, micro_batch=2, trainers=2, epochs=1)
    grouped = Schedule(tuple(range(64)), seed=2, global_batch=16, micro_batch=2, trainers=2, epochs=1, lengths=lengths)
    for step in range(plain.total_steps):
        a, b = plain.global_batch_at(step), grouped.global_batch_at(step)
        assert sorted(a) == sorted(b)  # the same samples train in the same step
        micro = [b[k : k + 2] for k in range(0, 16, 2)]
        spread = sum(max(lengths[i] for i in m) - min(lengths[i] for i in m) for m in micro)
        assert spread <= sum(
            max(lengths[i] for i in a[k : k + 2]) - min(lengths[i] for i in a[k : k + 2]) for k in range(0, 16, 2)
        )
        per_trainer = [sum(lengths[i] for i in b[t * 8 : (t + 1) * 8]) for t in range(2)]
        assert abs(per_trainer[0] - per_trainer[1]) <= max(lengths) * 2


def test_padding_benchmark_meets_the_targets_with_packing_and_length_grouping():
    from poft_ds.bench.padding import padding_efficiency

    r = padding_efficiency()  # the benchmark as `poft-ds bench padding` runs it
    assert 700 < r["observed_median_tokens"] < 900
    assert r["scoring"]["length_grouped"] >= 0.9 > r["scoring"]["pad_to_max_length"]
    assert r["training"]["length_grouped"] >= 0.9
    assert r["scoring"]["length_grouped"] > r["scoring"]["pad_to_longest_unsorted"]
    # Padding-free packing: processed / real tokens <= 1.05 (empty passes of busier ranks included).
    assert 1 / r["scoring"]["packed"] <= 1.05 and 1 / r["training"]["packed"] <= 1.05
    assert r["scoring"]["packed"] > r["scoring"]["length_grouped"]


@pytest.mark.parametrize(("trainers", "ref_ranks"), [(1, 1), (2, 3), (3, 2)])
def test_packed_micro_batches_partition_each_step_within_the_budget(trainers, ref_ranks):
    g = torch.Generator().manual_seed(0)
    lengths = torch.empty(300).log_normal_(4.0, 0.8, generator=g).clamp(4, 400).long().tolist()
    lengths[7] = 500  # longer than the budget: a micro-batch of its own
    s = Schedule(tuple(range(300)), 3, 48, 1, trainers, epochs=1, lengths=lengths, max_tokens=400)
    for step in range(s.total_steps):
        rows = s.global_batch_at(step)
        plans = [s.micro_batches(step, t) for t in range(trainers)]
        assert len({len(p) for p in plans}) == 1  # every trainer runs as many passes
        flat = sorted(p for plan in plans for m in plan for p in m)
        assert flat == list(range(48))  # each position exactly once
        for plan in plans:
            for m in plan:
                tokens = sum(lengths[rows[p]] for p in m)
                assert tokens <= 400 or len(m) == 1
        # As few passes as one trainer's share of the tokens needs, give or take a pass.
        total = sum(lengths[r] for r in rows)
        assert len(plans[0]) <= -(-total // (400 * trainers)) + 2
        # Reference ranks find each trainer's positions the same way.
        for t in range(trainers):
            got = sorted(p for j in range(ref_ranks) for p in shared_positions(s, step, t, ref_ranks, j))
            assert got == sorted(s.trainer_positions(t, step))
    again = Schedule(tuple(range(300)), 3, 48, 1, trainers, epochs=1, lengths=lengths, max_tokens=400)
    assert [again.micro_batches(k, 0) for k in range(s.total_steps)] == [
        s.micro_batches(k, 0) for k in range(s.total_steps)
    ]


def test_best_fit_decreasing_fills_bins_and_balances_trainers():
    # 6 x 60 + 6 x 40 tokens, budget 100: best fit pairs each 60 with a 40 (6 full bins).
    plan = pack_positions([60, 40] * 6, 100, 2)
    assert [len(p) for p in plan] == [3, 3]
    assert all(sorted(len(m) for m in mb) == [2, 2, 2] for mb in plan)
    # 3 bins for 2 trainers: one trainer runs an empty pass.
    plan = pack_positions([90, 90, 90], 100, 2)
    assert sorted(len(m) for mb in plan for m in mb) == [0, 1, 1, 1]


def test_rows_in_steps_are_the_rows_of_those_steps():
    s = Schedule(tuple(range(3, 53)), seed=4, global_batch=8, micro_batch=2, trainers=2, epochs=1, max_steps=14)
    for start, stop in ((0, 14), (5, 9), (6, 7), (3, 3)):
        expected = [r for k in range(start, stop) for r in s.global_batch_at(k)]
        assert s.rows_in_steps(start, stop).tolist() == expected
