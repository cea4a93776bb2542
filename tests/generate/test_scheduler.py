"""loratune/generate/scheduler.py: the prefill policy alone, on plain numbers (no model): the budget holds with
padding counted, admission is first come first served into free slots, and a long prompt is prefilled in chunks
that never take more than one budget from the running rows."""

from __future__ import annotations

import random

import pytest

from loratune.errors import ConfigError
from loratune.generate.scheduler import Group, Scheduler, StepPlan


def test_prompts_that_fit_go_in_one_group_padding_counted():
    plan = Scheduler(20).plan([3, 5, 4], free_slots=8)
    assert plan == StepPlan(groups=(Group(3, 15),))  # 3 rows x the longest (5), not 3 + 5 + 4
    assert plan.tokens == 15 and plan.admitted == 3


def test_padding_closes_a_group_and_the_rest_of_the_budget_takes_the_next():
    # [2, 9]: 2 x 9 = 18 fits 20; adding 2 more (3 x 9 = 27) does not: the group closes, 2 tokens are left
    plan = Scheduler(20).plan([2, 9, 2, 2, 7], free_slots=8)
    assert plan.groups == (Group(2, 18), Group(1, 2)) and plan.tokens == 20
    assert plan.admitted == 3  # the 7 waits: it does not fit what is left, and nothing overtakes it


def test_first_come_first_served_a_later_short_prompt_never_overtakes():
    plan = Scheduler(10).plan([6, 8, 1, 1], free_slots=4)
    assert plan.groups == (Group(1, 6),)  # the 8 does not fit the 4 left: the 1s behind it wait too


def test_free_slots_bound_the_admissions():
    assert Scheduler(100).plan([1] * 10, free_slots=3).groups == (Group(3, 3),)
    assert Scheduler(100).plan([1] * 10, free_slots=0) == StepPlan()
    assert Scheduler(100).plan([], free_slots=4) == StepPlan()


def test_a_prompt_longer_than_the_budget_starts_in_chunks_from_what_is_left():
    plan = Scheduler(20).plan([4, 45, 3], free_slots=4)
    assert plan.groups == (Group(1, 4),) and plan.new_chunk == 16 and plan.tokens == 20
    assert plan.admitted == 2


def test_a_prompt_within_the_budget_waits_for_a_whole_one():
    assert Scheduler(20).plan([15, 12], free_slots=4) == StepPlan(groups=(Group(1, 15),))


def test_a_chunked_prompt_goes_first_and_takes_the_whole_budget_until_its_last_chunk():
    s = Scheduler(20)
    assert s.plan([3, 3], free_slots=2, chunked_left=29) == StepPlan(chunk=20)
    assert s.plan([3, 3], free_slots=2, chunked_left=9) == StepPlan(chunk=9, groups=(Group(2, 6),))
    # its last chunk done, another long prompt may start with what is left
    assert s.plan([50], free_slots=2, chunked_left=9) == StepPlan(chunk=9, new_chunk=11)


def test_only_one_prompt_is_chunked_at_a_time():
    plan = Scheduler(20).plan([45, 45], free_slots=4)
    assert plan == StepPlan(new_chunk=20)


def test_the_queue_is_read_only_as_far_as_the_step_admits():
    def lengths():
        yield from (2, 2, 9)  # the 9 is read to see that it does not fit
        raise AssertionError("read past the first prompt the step cannot admit")

    assert Scheduler(4).plan(lengths(), free_slots=8).groups == (Group(2, 4),)


def test_a_budget_below_one_is_refused():
    with pytest.raises(ConfigError, match="prefill_tokens"):
        Scheduler(0)


@pytest.mark.parametrize("seed", range(5))
def test_simulated_serving_keeps_every_rule(seed):
    """Many steps of a simulated engine (rows take their slots, finish after a few steps): every step stays
    within its budget, admissions are in queue order, a chunked prompt finishes in ceil(n / budget) steps or
    fewer, and every request is eventually served."""
    rng = random.Random(seed)
    budget, slots = rng.choice([8, 20, 64]), rng.randint(1, 6)
    queue = [(i, rng.choice([rng.randint(1, budget), rng.randint(budget + 1, 4 * budget)])) for i in range(60)]
    scheduler, running, admitted, chunked, steps = Scheduler(budget), [], [], None, 0
    while queue or running or chunked:
        steps += 1
        assert steps < 10_000
        free = slots - len(running) - (chunked is not None)
        plan = scheduler.plan([n for _, n in queue], free, None if chunked is None else chunked[1])
        assert plan.tokens <= budget
        if chunked is not None:
            assert plan.chunk == min(budget, chunked[1])
            chunked = (chunked[0], chunked[1] - plan.chunk)
            if chunked[1] == 0:
                running.append([chunked[0], rng.randint(1, 5)])
                chunked = None
        for group in plan.groups:
            longest = max(n for _, n in queue[:group.count])
            assert group.tokens == group.count * longest
            for i, _ in queue[:group.count]:
                running.append([i, rng.randint(1, 5)])
                admitted.append(i)
            queue = queue[group.count:]
        if plan.new_chunk:
            assert chunked is None and queue[0][1] > budget
            chunked = (queue[0][0], queue[0][1] - plan.new_chunk)
            admitted.append(queue[0][0])
            queue = queue[1:]
        assert len(running) + (chunked is not None) <= slots
        for row in running:  # every running row decodes one token each step
            row[1] -= 1
        running = [row for row in running if row[1] > 0]
    assert admitted == sorted(admitted) and len(admitted) == 60
