"""Placement of pool models on pool pods: first-fit-decreasing by memory (a pure function)."""

from __future__ import annotations

from caffe_operator.placement import ModelDemand, PodSlot, place

MiB = 2**20


def pods(*names: str, budget: int = 1000 * MiB, holds: dict[str, set[str]] | None = None,
         down: tuple[str, ...] = ()) -> list[PodSlot]:
    holds = holds or {}
    return [PodSlot(n, budget, frozenset(holds.get(n, ())), n not in down) for n in names]


def test_biggest_first_fills_pods_in_order():
    got = place(pods("p0", "p1"), [ModelDemand("small", 1, 300 * MiB), ModelDemand("big", 1, 800 * MiB),
                                   ModelDemand("mid", 1, 600 * MiB)])
    # big → p0 (800); mid does not fit p0 (1400) → p1 (600); small fits p1 (900)
    assert got.pods == {"big": ["p0"], "mid": ["p1"], "small": ["p1"]}
    assert got.unschedulable == {}
    assert got.by_pod() == {"p0": {"big"}, "p1": {"mid", "small"}}


def test_twenty_small_models_pack_into_few_pods():
    models = [ModelDemand(f"m{i:02d}", 1, 90 * MiB) for i in range(20)]
    got = place(pods("p0", "p1", "p2"), models)
    assert not got.unschedulable
    assert {p: len(ms) for p, ms in got.by_pod().items()} == {"p0": 11, "p1": 9}


def test_copies_go_to_different_pods():
    got = place(pods("p0", "p1", "p2"), [ModelDemand("digits", 2, 10 * MiB)])
    assert got.pods == {"digits": ["p0", "p1"]}


def test_more_copies_than_pods_is_unschedulable_with_a_reason():
    got = place(pods("p0"), [ModelDemand("digits", 2, 10 * MiB)])
    assert got.pods == {"digits": ["p0"]}
    assert got.unschedulable["digits"] == (
        "1 of 2 copies placed: the pool has 1 ready pods and a pod holds one copy; add pods or lower replicas"
    )


def test_a_model_bigger_than_any_free_space_says_what_it_needs():
    got = place(pods("p0", "p1"), [ModelDemand("a", 1, 700 * MiB), ModelDemand("b", 1, 700 * MiB),
                                   ModelDemand("huge", 1, 1200 * MiB)])
    assert got.pods["huge"] == []
    assert got.unschedulable["huge"] == (
        "0 of 1 copies placed: one copy needs 1200 MiB and no other pod has that much free (p0 1000 MiB, p1 1000 MiB)"
    )
    assert got.pods["a"] == ["p0"] and got.pods["b"] == ["p1"]


def test_loaded_models_stay_put():
    # FFD from scratch would put big on p0; it is loaded on p1 and stays there
    got = place(pods("p0", "p1", holds={"p1": {"big"}}), [ModelDemand("big", 1, 800 * MiB),
                                                           ModelDemand("small", 1, 100 * MiB)])
    assert got.pods == {"big": ["p1"], "small": ["p0"]}


def test_a_dead_pods_models_move_to_the_others():
    before = {"p0": {"a"}, "p1": {"b"}}
    got = place(pods("p0", "p1", holds=before, down=("p1",)),
                [ModelDemand("a", 1, 300 * MiB), ModelDemand("b", 1, 300 * MiB)])
    assert got.pods == {"a": ["p0"], "b": ["p0"]}


def test_no_ready_pod():
    got = place(pods("p0", down=("p0",)), [ModelDemand("a", 1, 1)])
    assert got.unschedulable == {"a": "0 of 1 copies placed: the pool has no ready pod"}


def test_surplus_copies_are_dropped_and_zero_copies_unload():
    got = place(pods("p0", "p1", holds={"p0": {"a", "b"}, "p1": {"a"}}),
                [ModelDemand("a", 1, 10 * MiB), ModelDemand("b", 0, 10 * MiB)])
    assert got.pods == {"a": ["p0"], "b": []}
    assert got.by_pod() == {"p0": {"a"}}
