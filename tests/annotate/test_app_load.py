"""Load test of the annotation app on loopback: 20 concurrent clients × 50 answers, nothing lost, no error reply."""

import threading
import time
from urllib.parse import quote

import pytest

from helpers import AnnotateServer, http_json
from refusalscope.annotate.store import AnnotationStore

CLIENTS, ANSWERS, BUDGET_S = 20, 50, 240


@pytest.mark.timeout(600)
def test_20_clients_x_50_answers(analysed_run):
    run, _, info = analysed_run
    errors: list[str] = []
    done = [0] * CLIENTS
    with AnnotateServer(run, "--n-pipeline", "1000", "--n-active", "100", "--n-inactive", "100") as server:
        deadline = time.monotonic() + BUDGET_S
        url = server.url

        def client(i: int) -> None:
            name = f"load{i:02d}"
            status, body = http_json(url + "api/start", {"name": name})
            if status != 200:
                errors.append(f"{name} start: {status} {body}")
                return
            while done[i] < ANSWERS and time.monotonic() < deadline:
                status, nxt = http_json(f"{url}api/next?annotator={quote(name)}")
                if status != 200:
                    errors.append(f"{name} next: {status} {nxt}")
                    return
                cats = info["labels"][nxt["feature"]]
                status, body = http_json(url + "api/answer", {"annotator": name, "feature": nxt["feature"],
                                                               "token": nxt["token"], "categories": cats,
                                                               "none": not cats})
                if status != 200:
                    errors.append(f"{name} answer: {status} {body}")
                    return
                done[i] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=BUDGET_S + 60)
        seconds = time.monotonic() - start
    assert not errors, errors[:5]
    assert done == [ANSWERS] * CLIENTS, f"only {sum(done)} answers in {seconds:.0f} s"
    answers = AnnotationStore(run / "annotations.sqlite").answers()
    assert len(answers) == CLIENTS * ANSWERS
    assert not answers.duplicated(["annotator", "feature"]).any()
    assert (answers.groupby("annotator").size() == ANSWERS).all()
    assert all(sorted(c) == sorted(info["labels"][f]) for f, c in zip(answers["feature"], answers["categories"]))
