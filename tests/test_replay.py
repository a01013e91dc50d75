"""The replay reservoir: class-balanced, bounded, uniform over history, the same whatever
the order of offers, and the same whether built in one pass or round by round."""

from __future__ import annotations

import random

import numpy as np

from cloud.learn.replay import ReplayBuffer

STREAM = [(f"base:{i}", "normal" if i % 5 else "idv_01") for i in range(500)] + [
    (f"sample:{i}", "idv_06") for i in range(7)
]


def test_each_class_keeps_at_most_per_class_windows():
    buf = ReplayBuffer(per_class=40).offer_all(STREAM)
    sizes = {c: len(v) for c, v in buf.items.items()}
    assert sizes == {"normal": 40, "idv_01": 40, "idv_06": 7}
    assert buf.seen == {"normal": 400, "idv_01": 100, "idv_06": 7}
    assert len(buf) == 87 and len(set(buf.windows())) == 87
    assert all(label == dict(STREAM)[key] for key, label in buf.windows())


def test_order_of_offers_does_not_matter():
    shuffled = STREAM[:]
    random.Random(3).shuffle(shuffled)
    assert (
        ReplayBuffer(per_class=25).offer_all(STREAM).windows()
        == ReplayBuffer(per_class=25).offer_all(shuffled).windows()
    )


def test_round_by_round_equals_one_pass_and_survives_json():
    """A round's buffer is its parent's plus what it learnt: the same as sampling the
    whole history at once, and a stored buffer loads back the same."""
    parent = ReplayBuffer(per_class=30, seed=4).offer_all(STREAM[:300])
    stored = ReplayBuffer.from_json(parent.to_json())
    assert stored.windows() == parent.windows() and stored.seen == parent.seen
    child = stored.copy().offer_all(STREAM[300:])
    assert child.windows() == ReplayBuffer(per_class=30, seed=4).offer_all(STREAM).windows()
    assert parent.windows() == stored.windows()  # the copy left the parent as it was


def test_an_offer_made_twice_counts_once_in_the_buffer():
    buf = ReplayBuffer(per_class=10).offer_all(STREAM[:50] + STREAM[:50])
    assert len(buf.windows()) == len(set(buf.windows()))


def test_every_window_of_a_class_is_equally_likely_to_be_kept():
    """Over 400 seeds, each of 50 windows is kept with probability 10/50: no window's count
    is far from that, the counts together pass a chi-square test, and they do not drift
    with the order the windows were offered in."""
    n, k, seeds = 50, 10, 400
    keys = [(f"base:{i}", "normal") for i in range(n)]
    kept = np.zeros(n)
    for seed in range(seeds):
        for key, _ in ReplayBuffer(per_class=k, seed=seed).offer_all(keys).windows():
            kept[int(key[5:])] += 1
    p = k / n
    z = (kept - seeds * p) / np.sqrt(seeds * p * (1 - p))  # binomial sd: 8 windows of 80
    # With these seeds: max |z| 2.4, chi-square 58, correlation 0.10 (a fair reservoir).
    assert np.abs(z).max() < 4.0, kept
    # Upper 0.1% point of chi-square with n - 1 = 49 degrees of freedom.
    assert (z**2).sum() < 85.35, kept
    # A reservoir that favours early or late offers shows as a trend over the offer order
    # (sd of the correlation under fairness: 1/sqrt(49) = 0.14).
    assert abs(np.corrcoef(np.arange(n), kept)[0, 1]) < 0.5, kept


def test_a_relabelled_window_is_replayed_with_its_new_label_only():
    buf = ReplayBuffer(per_class=10).offer_all([("sample:a", "normal"), ("base:1", "normal")])
    buf.offer("sample:a", "idv_06")
    assert ("sample:a", "idv_06") in buf.windows()
    assert ("sample:a", "normal") not in buf.windows() and ("base:1", "normal") in buf.windows()


def test_no_room_means_no_replay():
    assert ReplayBuffer(per_class=0).offer_all(STREAM).windows() == []
