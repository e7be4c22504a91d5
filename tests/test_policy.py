"""The failure policy with made-up status records: no cluster."""
from distopt.runtime.policy import WorkerStatus as S, decide, shrink_size


def _decide(statuses, **kw):
    args = {"failures_so_far": 0, "max_failures": 3, "min_workers": 1, "global_batch_size": 12,
            "accumulation": 1, "can_replace": True, **kw}
    return decide(statuses, **args)


def test_all_ok_continues():
    assert _decide([S(0), S(1)]).action == "continue"


def test_collective_error_with_everyone_alive_retries():
    d = _decide([S(0, ok=False, collective_error="allgather failed"), S(1)])
    assert d.action == "retry" and d.lost == ()


def test_dead_rank_is_replaced_when_capacity_exists():
    d = _decide([S(0, ok=False, collective_error="x"), S(1, ok=False, dead=True), S(2, ok=False, collective_error="x")])
    assert d.action == "replace" and d.lost == (1,) and d.world_size == 3


def test_hung_rank_counts_as_lost():
    d = _decide([S(0, ok=False, collective_error="timeout"), S(1, ok=False, hung=True)])
    assert d.action == "replace" and d.lost == (1,)


def test_no_capacity_shrinks_to_a_size_that_splits_the_batch():
    statuses = [S(0), S(1, ok=False, dead=True), S(2), S(3), S(4, ok=False, dead=True)]
    d = _decide(statuses, global_batch_size=12, can_replace=False)
    assert d.action == "shrink" and d.world_size == 3 and d.lost == (1, 4)
    assert shrink_size(3, 1, 10, 1) == 2 and shrink_size(3, 1, 10, 5) == 2 and shrink_size(3, 3, 10, 1) is None


def test_shrink_below_min_workers_fails():
    d = _decide([S(0), S(1, ok=False, dead=True)], min_workers=2, can_replace=False)
    assert d.action == "fail" and "min_workers=2" in d.reason


def test_past_max_failures_fails():
    d = _decide([S(0), S(1, ok=False, dead=True)], failures_so_far=3)
    assert d.action == "fail" and "exceed max_failures=3" in d.reason


def test_user_error_fails_even_with_a_dead_rank():
    d = _decide([S(0, ok=False, user_error="ValueError: bad loss"), S(1, ok=False, dead=True)])
    assert d.action == "fail" and "rank 0" in d.reason


def test_grow_size_keeps_the_batch_divisible():
    from distopt.runtime.policy import grow_size
    assert grow_size(1, 1, 16, 1) == 2
    assert grow_size(2, 2, 6, 1) == 3  # 4 workers cannot split 6 samples; 3 can
    assert grow_size(2, 1, 16, 1) is None  # 3 workers cannot split 16
    assert grow_size(1, 0, 16, 1) is None
    assert grow_size(2, 2, 16, 2) == 4
