import threading

import pytest

from refusalscope.annotate.store import AnnotationError, AnnotationStore, clean_name

CATS = ["misinformation", "privacy violations", "wildchats"]
ITEMS = [(f"L{i % 3}/{i}", "pipeline" if i % 2 else "random_active") for i in range(12)]


@pytest.fixture
def store(tmp_path):
    s = AnnotationStore(tmp_path / "annotations.sqlite")
    assert s.initialise(ITEMS, CATS, {"seed": 5, "order": "per-annotator"})
    return s


def _answer(store, name, cats=("misinformation",), none=False):
    _, feature = store.next_feature(name)
    store.submit(name, feature, store.token(name, feature), list(cats), none)
    return feature


def test_sample_is_stored_once_and_survives_reopening(store, tmp_path):
    assert not store.initialise(list(reversed(ITEMS)), ["other"], {"seed": 9})
    again = AnnotationStore(tmp_path / "annotations.sqlite")
    assert again.items() == ITEMS and again.categories == CATS and again.options["seed"] == 5
    assert again.order("ann") == store.order("ann") and sorted(again.order("ann")) == sorted(f for f, _ in ITEMS)
    assert again.token("ann", ITEMS[0][0]) == store.token("ann", ITEMS[0][0])


def test_a_returning_annotator_resumes_at_the_first_unanswered(store, tmp_path):
    store.register("ann")
    given = [_answer(store, "ann") for _ in range(4)]
    assert given == store.order("ann")[:4]
    reopened = AnnotationStore(tmp_path / "annotations.sqlite")
    assert reopened.next_feature("ann") == (4, store.order("ann")[4])
    assert reopened.register("  ann ") == "ann"  # same person, same place
    assert reopened.next_feature("ann")[0] == 4


@pytest.mark.parametrize("name,message", [("", "enter your name"), ("   ", "enter your name"),
                                          ("x" * 65, "at most 64"), ("a\x00b", "control characters")])
def test_bad_names(name, message):
    with pytest.raises(AnnotationError, match=message):
        clean_name(name)


def test_every_bad_submit_is_rejected_with_a_message_and_changes_nothing(store):
    store.register("ann")
    first = _answer(store, "ann")
    _, nxt = store.next_feature("ann")
    later = store.order("ann")[3]
    token = store.token("ann", nxt)
    bad = [
        (("ann", "L9/999", token, ["wildchats"], False), "unknown feature", 400),
        (("ann", nxt, token, ["not a category"], False), "unknown category", 400),
        (("ann", nxt, token, [], False), "at least one category", 400),
        (("ann", nxt, token, ["wildchats"], True), "not both", 400),
        (("ann", first, store.token("ann", first), ["wildchats"], False), "already answered", 409),
        (("ann", later, store.token("ann", later), ["wildchats"], False), "not your next feature", 409),
        (("ann", nxt, "forged", ["wildchats"], False), "stale", 409),
        (("ann", nxt, store.token("bob", nxt), ["wildchats"], False), "stale", 409),
        (("bob", nxt, store.token("bob", nxt), ["wildchats"], False), "unknown annotator", 400),
        (("", nxt, token, ["wildchats"], False), "enter your name", 400),
    ]
    before = store.answers()
    for args, message, status in bad:
        with pytest.raises(AnnotationError, match=message) as e:
            store.submit(*args)
        assert e.value.status == status
    after = store.answers()
    assert after.equals(before) and list(after["categories"]) == [["misinformation"]]
    assert store.next_feature("ann") == (1, nxt)


def test_none_is_stored_as_the_empty_set(store):
    store.register("ann")
    _answer(store, "ann", cats=(), none=True)
    _answer(store, "ann", cats=("wildchats", "misinformation", "wildchats"))
    assert list(store.answers()["categories"]) == [[], ["misinformation", "wildchats"]]


def test_concurrent_annotators_lose_nothing_and_a_raced_duplicate_is_stored_once(store):
    names = [f"a{i}" for i in range(6)]
    for n in names:
        store.register(n)
    errors = []

    def work(name):
        try:
            for _ in range(len(ITEMS)):
                _answer(store, name)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    answers = store.answers()
    assert len(answers) == len(names) * len(ITEMS)
    assert all(store.next_feature(n) == (len(ITEMS), None) for n in names)

    store.register("racer")
    _, feature = store.next_feature("racer")
    token = store.token("racer", feature)
    results = []

    def race():
        try:
            store.submit("racer", feature, token, ["wildchats"], False)
            results.append("ok")
        except AnnotationError as e:
            results.append(e.status)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results, key=str) == [409] * 7 + ["ok"]
    assert (store.answers()["annotator"] == "racer").sum() == 1
