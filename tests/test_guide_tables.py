"""docs/WHEN_TO_USE_SOPHIA.md's tables are what experiments/value/tables.py computes from the
committed results: a figure and its data cannot drift apart."""

from __future__ import annotations

import pytest

from experiments.value import tables


def test_the_guide_has_every_table_and_no_other():
    assert set(tables.blocks(tables.GUIDE.read_text())) == set(tables.TABLES)


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_each_table_in_the_guide_is_recomputed_from_the_committed_results(name):
    written = tables.blocks(tables.GUIDE.read_text())[name]
    assert written == tables.render(name), (
        f"the guide's {name} table is not what its data give: run "
        "`python experiments/value/tables.py --write docs/WHEN_TO_USE_SOPHIA.md`")


def test_a_paired_gap_is_resolved_only_when_its_interval_excludes_zero():
    assert tables.Gap((0.2, 0.25, 0.3)).verdict() == "behind"
    assert tables.Gap((-0.1, 0.2, 0.3)).verdict() == "not resolved"
    assert tables.Gap((-0.2, -0.25, -0.3)).verdict() == "ahead"
    assert tables.Gap((0.1,)).verdict() == "one seed"
    low, high = tables.Gap((1.0, 2.0, 3.0)).interval()
    assert (low, high) == pytest.approx((2 - 4.303 / 3 ** 0.5, 2 + 4.303 / 3 ** 0.5))


def test_an_empty_block_does_not_swallow_the_next_one():
    text = ("<!-- table:a -->\n<!-- /table -->\nprose\n"
            "<!-- table:b -->\nold\n<!-- /table -->\n")
    assert tables.blocks(text) == {"b": "old"}
