"""Threads and determinism. A Classifier shared by several threads gives each text the result it gets alone, in
order (the lock lets one reader at a time use the llama.cpp context: interleaved decodes would mix documents' KV
cache); a thread that tries to read twice at once gets a clear error instead of a deadlock; closing waits for a
reading in another thread. The same input gives the same output twice in one process and across processes.

Every reading here is the LLM's (`lexical=False`, `--no-lexical`): the default bundle's words would answer these texts
without taking the llama.cpp context, which is what the lock guards."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge2dexit import Classifier, EngineSettings

TEXTS = [
    "A wonderful film. The acting was superb and the story moving. I loved every minute of it.",
    "What a waste of time. The plot made no sense. The acting was wooden. I wanted my money back.",
    "Great fun from start to end. The music was lovely.",
    "Boring. I fell asleep twice. Nothing happens for two hours.",
    "The first half drags, but the ending is brilliant. Worth seeing.",
    "I expected more. The director has done much better work. A disappointment.",
]
# What must agree: everything but the wall time.
STABLE = ("label", "scores", "policy", "exit_sentence", "exit_layer", "early", "sentences_read", "sentences_total",
          "layers_run", "operations", "token_layers", "tokens", "truncated")


def stable(result) -> dict:
    return {k: v for k, v in result.to_dict().items() if k in STABLE}


@pytest.fixture(scope="module")
def classifier():
    with Classifier(settings=EngineSettings(n_ctx=256), lexical=False) as clf:
        yield clf


@pytest.fixture(scope="module")
def alone(classifier):
    """Each text classified on its own, one after the other."""
    return {(text, policy): stable(classifier.classify(text, policy))
            for text in TEXTS for policy in ("prefix-mean", "paper2d")}


def test_threads_sharing_a_classifier_get_what_each_text_gets_alone(classifier, alone):
    work = [key for _ in range(3) for key in alone]  # every (text, policy) three times, from 6 threads at once
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda key: stable(classifier.classify(*key)), work))
    for key, result in zip(work, results):
        assert result == alone[key], key


def stream(classifier, text):
    """`text` fed sentence by sentence (each decided sentence read as it arrives), until the stream decides."""
    with classifier.stream() as s:
        for sentence in text.split(". "):
            if s.feed(sentence + ". ") is not None:
                break
        return s.result or s.finish()


@pytest.fixture(scope="module")
def streamed_alone(classifier):
    """Each text streamed on its own, one after the other (a stream groups its decodes otherwise than classify, so
    its scores are compared with a stream's, which are the same bit for bit)."""
    return [stable(stream(classifier, text)) for text in TEXTS]


def test_streams_and_batches_from_threads_do_not_mix(classifier, alone, streamed_alone):
    """A stream holds the classifier until it is closed; a classify_many holds it while it is iterated. Had two
    readers' decodes interleaved in the one llama.cpp context, their KV caches would mix and their numbers change."""

    def batch(texts):
        return dict(classifier.classify_many(texts))

    with ThreadPoolExecutor(4) as pool:
        streamed = [pool.submit(stream, classifier, text) for text in TEXTS]
        batched = pool.submit(batch, TEXTS)
        plain = [pool.submit(classifier.classify, text) for text in TEXTS]
        assert [stable(f.result()) for f in streamed] == streamed_alone
        assert {i: stable(r) for i, r in batched.result().items()} == {
            i: alone[(text, "prefix-mean")] for i, text in enumerate(TEXTS)}
        assert [stable(f.result()) for f in plain] == [alone[(text, "prefix-mean")] for text in TEXTS]


def test_reading_twice_at_once_in_one_thread_is_an_error(classifier):
    """A classify inside a classify_many loop (or with a stream open) would take the sequence the first reading
    uses; with a plain lock it would wait for itself forever."""
    batch = classifier.classify_many(TEXTS[:2])
    next(batch)
    with pytest.raises(RuntimeError, match="already reading with this classifier"):
        classifier.classify(TEXTS[0])
    batch.close()
    with classifier.stream():
        with pytest.raises(RuntimeError, match="already reading"):
            classifier.stream()
    assert classifier.classify(TEXTS[0]).label in classifier.labels  # both released


def test_close_waits_for_a_reading_in_another_thread():
    clf = Classifier(settings=EngineSettings(n_ctx=256), lexical=False)
    stream = clf.stream()
    closer = threading.Thread(target=clf.close)
    closer.start()
    closer.join(timeout=1)
    assert closer.is_alive()  # waiting for the stream
    stream.feed(TEXTS[0])
    stream.close()
    closer.join(timeout=30)
    assert not closer.is_alive() and clf.closed
    with pytest.raises(RuntimeError, match="is closed"):
        clf.classify(TEXTS[0])


def test_closed_means_closed_on_every_path():
    """Texts the words alone decide never reach llama.cpp; a closed classifier refuses them all the same, and `with`
    on a closed one fails at once."""
    clf = Classifier(settings=EngineSettings(n_ctx=256))
    words_decide = "A wonderful film. I loved every minute of it. A masterpiece. Superb acting, brilliant story."
    assert clf.classify(words_decide).answered_by == "words"
    clf.close()
    for read in (lambda: clf.classify(words_decide), lambda: list(clf.classify_many([words_decide])),
                 lambda: clf(words_decide), clf.stream):
        with pytest.raises(RuntimeError, match="is closed"):
            read()
    with pytest.raises(RuntimeError, match="is closed"):
        with clf:
            pass


# --- determinism --------------------------------------------------------------------------------------------------


def test_the_same_input_gives_the_same_output_in_one_process(classifier, alone):
    again = {key: stable(classifier.classify(*key)) for key in alone}
    assert again == alone


def cli_records(paths) -> list[dict]:
    command = "from edge2dexit.cli import main; main()"
    run = subprocess.run([sys.executable, "-c", command, "classify", *map(str, paths), "--json",
                          "--ordered", "--n-ctx", "256", "--no-lexical"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return [stable_record(json.loads(line)) for line in run.stdout.splitlines()]


def stable_record(record: dict) -> dict:
    return {k: v for k, v in record.items() if k in STABLE or k == "input"}


def test_the_same_input_gives_the_same_output_across_processes(tmp_path, alone):
    paths = []
    for i, text in enumerate(TEXTS):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text)
    first, second = cli_records(paths), cli_records(paths)
    assert first == second
    assert [{k: v for k, v in r.items() if k != "input"} for r in first] == [
        alone[(text, "prefix-mean")] for text in TEXTS]  # and the same as in this process
