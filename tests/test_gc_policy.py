"""The engine process's garbage-collection policy: full collections wait for an idle loop."""

from __future__ import annotations

import gc
import weakref

import pytest

from kiln.executor.gc_policy import GcPauses, IdleFullCollections


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def _churn_until_full_collection_due(policy: IdleFullCollections, times: int) -> weakref.ref:
    """Make cyclic garbage in the oldest generation, then allocate until ``times`` default cadences of
    generation-1 passes ran."""
    node = _Node()
    ref = weakref.ref(node)
    gc.collect()  # node survives into the oldest generation, where only a full pass frees it
    del node
    keep = []
    while gc.get_count()[2] < times * policy.threshold2:
        keep.append([[] for _ in range(100)])  # tracked containers drive the collector's counts
        if len(keep) > 1000:
            keep.clear()
    return ref


@pytest.fixture
def policy():
    p = IdleFullCollections(busy_limit=3)
    p.install()  # (its own full collection is not counted)
    pauses = GcPauses()
    try:
        yield p, pauses
    finally:
        p.uninstall()
        pauses.close()


def test_no_automatic_full_collection_then_one_when_idle(policy):
    p, pauses = policy
    ref = _churn_until_full_collection_due(p, 1)
    pauses.full_collections = 0  # (the helper's own gc.collect)
    assert ref() is not None  # the default policy would have run one
    p.on_busy_step()  # under load: not yet (busy_limit cadences)
    assert pauses.full_collections == 0
    p.on_idle()
    assert pauses.full_collections == 1 and ref() is None and gc.get_count()[2] == 0
    p.on_idle()  # nothing due: no second pass
    assert pauses.full_collections == 1
    assert pauses.total > 0 and pauses.since_last_read() == pauses.total and pauses.since_last_read() == 0


def test_pauses_are_counted_without_the_policy():
    pauses = GcPauses()
    try:
        gc.collect()
        assert pauses.full_collections == 1 and pauses.since_last_read() > 0
    finally:
        pauses.close()
    gc.collect()
    assert pauses.full_collections == 1  # closed: no longer listening


def test_unbroken_load_still_collects_after_busy_limit_cadences(policy):
    p, pauses = policy
    ref = _churn_until_full_collection_due(p, p.busy_limit)
    pauses.full_collections = 0
    assert ref() is not None
    p.on_busy_step()
    assert pauses.full_collections == 1 and ref() is None


def test_uninstall_restores_the_thresholds():
    before = gc.get_threshold()
    p = IdleFullCollections()
    p.install()
    assert gc.get_threshold()[2] > 10**9 and gc.get_freeze_count() > 0
    p.uninstall()
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="busy_limit must be >= 1"):
        IdleFullCollections(busy_limit=0)


def test_freeze_startup_objects_leaves_live_ones_out_and_still_collects_new_garbage():
    from kiln.executor.gc_policy import freeze_startup_objects

    class Node:
        pass

    live = Node()
    live.self = live  # a cycle alive at start-up: frozen, never scanned again
    try:
        frozen = freeze_startup_objects()
        # frozen objects that die afterwards (another thread's, say) leave the count: it may only fall
        assert frozen >= 1 and frozen - 100 <= gc.get_freeze_count() <= frozen
        assert not any(o is live for o in gc.get_objects())  # in no generation a collection scans
        dead = Node()
        dead.self = dead
        ref = weakref.ref(dead)
        del dead
        gc.collect()
        assert ref() is None  # garbage made after the freeze is still collected
    finally:
        gc.unfreeze()
