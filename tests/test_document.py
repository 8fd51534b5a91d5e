"""Document bookkeeping (positions, valid depths, forgets, costs) against a fake executor, and `replay`: pure logic,
no llama.cpp. The fake also checks that no decode ever reads KV valid below its depth."""

from __future__ import annotations

import numpy as np
import pytest

from edge2dexit.document import Decode, Document, Forget, SentenceMeans, replay, sentence_by_sentence, whole_text
from edge2dexit.errors import ContextOverflowError

from fakes import FakeExecutor, new_document, sentences, state


def test_append_reads_the_layers_asked_for_at_the_right_positions():
    fake, doc = FakeExecutor(), new_document(first_position=5)
    toks = sentences(2, 3, 4)
    states = fake.run(doc.append(toks[:2], 6, layers=[1, 4]))
    assert [type(s) for s in states] == [SentenceMeans, SentenceMeans]
    assert [(s.index, s.n_tokens, s.depth, s.layers) for s in states] == [(0, 2, 6, (1, 4)), (1, 3, 6, (1, 4))]
    np.testing.assert_array_equal(states[1].at(4), state(1, 4))
    np.testing.assert_array_equal(states[0].means, [state(0, 1), state(0, 4)])
    (third,) = fake.run(doc.append(toks[2:], 6))  # default: every layer below the depth
    assert third.layers == tuple(range(6)) and third.index == 2
    assert [(c.position, c.sentences, c.n_tokens, c.depth) for c in fake.decodes()] == [(5, (0, 1), 5, 6), (10, (2,), 4, 6)]
    assert doc.n_sentences == 3 and doc.n_tokens == 9 and doc.room == 1000 - 9
    assert doc.valid_depths == (6, 6, 6) and doc.token_layers == 9 * 6 and doc.operations == 3 * 6
    assert doc.decode_calls == 2 and fake.forgets() == []


def test_readings_are_lazy_generators_that_yield_requests():
    doc = new_document()
    reading = doc.append(sentences(3), 4)
    assert doc.n_sentences == 0  # nothing happens before the reading is run
    request = next(reading)
    assert isinstance(request, Decode) and request.doc is doc and request.depth == 4
    assert doc.n_sentences == 1 and doc.decode_calls == 0  # counted once answered
    with pytest.raises(StopIteration) as done:
        reading.send(FakeExecutor()(request))
    assert done.value.value[0].index == 0 and doc.decode_calls == 1


def test_deepening_forgets_and_redecodes_one_sentence_at_a_time():
    fake, doc = FakeExecutor(), new_document(first_position=5)
    toks = sentences(2, 3, 4)
    fake.run(doc.append(toks[:2], 3))
    fake.run(doc.append(toks[2:], 5))  # the first two are valid to 3 only: re-decoded at 5 first
    assert fake.forgets() == [5]
    assert [(c.position, c.sentences, c.depth) for c in fake.decodes()] == [
        (5, (0, 1), 3), (5, (0,), 5), (7, (1,), 5), (10, (2,), 5)]
    assert doc.valid_depths == (5, 5, 5)
    assert doc.token_layers == 5 * 3 + 2 * 5 + 3 * 5 + 4 * 5 == fake.token_layers()
    assert doc.operations == 3 * 5  # the paper counts each (sentence, layer) cell once
    assert doc.decode_calls == 4


def test_deepen_returns_the_redecoded_states_and_nothing_when_already_valid():
    fake, doc = FakeExecutor(), new_document()
    fake.run(doc.append(sentences(1, 1, 1), 2))
    deepened = fake.run(doc.deepen(4, layers=[3]))
    assert [(s.index, s.layers) for s in deepened] == [(0, (3,)), (1, (3,)), (2, (3,))]
    np.testing.assert_array_equal(deepened[2].at(3), state(2, 3))
    calls = len(fake.calls)
    assert fake.run(doc.deepen(4)) == [] and fake.run(doc.deepen(2)) == []  # valid: no request at all
    assert len(fake.calls) == calls and doc.valid_depths == (4, 4, 4)


def test_abandoned_deepening_keeps_positions_and_depths_consistent():
    fake, doc = FakeExecutor(), new_document(first_position=3)
    toks = sentences(2, 2, 2, 2, 2)
    for t in toks[:4]:
        fake.run(doc.append([t], 3))
    for expected in (0, 1):
        states = fake.run(doc.deepen_next(9))
        assert states.index == expected and states.depth == 9
    # sentences 2 and 3 were forgotten with sentence 0 (everything after it leaves the cache)
    assert fake.forgets() == [3] and doc.valid_depths == (9, 9, 0, 0)
    (fifth,) = fake.run(doc.append([toks[4]], 6))  # re-decodes 2 and 3 at 6 first; no forget needed
    assert fake.forgets() == [3] and fifth.index == 4
    assert [(c.position, c.sentences, c.depth) for c in fake.decodes()[-3:]] == [(7, (2,), 6), (9, (3,), 6), (11, (4,), 6)]
    assert doc.valid_depths == (9, 9, 6, 6, 6)
    assert doc.operations == 9 + 9 + 6 + 6 + 6
    assert doc.token_layers == fake.token_layers() == 4 * 2 * 3 + 2 * 2 * 9 + 3 * 2 * 6


def test_stop_rule_ends_the_decode_and_the_cost_is_what_was_computed():
    fake, doc = FakeExecutor(), new_document()
    seen = []

    def stop(layer, means):
        seen.append(layer)
        np.testing.assert_array_equal(means, [state(0, layer), state(1, layer)])
        return layer == 2

    states = fake.run(doc.append(sentences(3, 4), 8, layers=[0, 2, 5], stop=stop))
    assert seen == [0, 2]
    assert [s.depth for s in states] == [3, 3] and states[0].layers == (0, 2)
    assert doc.valid_depths == (3, 3) and doc.token_layers == 7 * 3 and doc.operations == 2 * 3


def test_a_shared_decode_that_went_deeper_is_valid_and_paid_to_its_depth():
    """In a batch, a document whose rule fired still has KV (and cost) to the depth the shared graph reached."""
    fake, doc = FakeExecutor(shared=True), new_document()
    (states,) = fake.run(doc.append(sentences(3), 8, stop=lambda layer, means: layer == 2))
    assert states.depth == 3 and states.layers == (0, 1, 2)
    assert doc.valid_depths == (8,) and doc.token_layers == 3 * 8 and doc.operations == 8
    fake.run(doc.append(sentences(2), 8))  # already valid at 8: no re-decode
    assert fake.forgets() == [] and len(fake.decodes()) == 2


def test_text_longer_than_the_room_is_refused_and_the_document_stays_usable():
    fake, doc = FakeExecutor(), new_document(capacity=10)
    fake.run(doc.append(sentences(4), 2))
    with pytest.raises(ContextOverflowError, match="needs at least 11 tokens but the context leaves room for 10"):
        fake.run(doc.append(sentences(3, 4), 2))
    assert doc.n_sentences == 1 and doc.room == 6 and len(fake.calls) == 1
    fake.run(doc.append(sentences(6), 2))
    assert doc.room == 0 and doc.valid_depths == (2, 2)


def test_sentence_by_sentence_stacks_means_one_decode_each():
    fake, doc = FakeExecutor(), new_document()
    means = fake.run(sentence_by_sentence(doc, sentences(2, 2, 2), 4, layers=[1, 3]))
    assert means.shape == (3, 2, 4)
    np.testing.assert_array_equal(means[2, 1], state(2, 3))
    assert doc.decode_calls == 3 and doc.token_layers == 6 * 4


def test_whole_text_stacks_the_same_means_in_one_decode():
    fake, doc = FakeExecutor(), new_document()
    means = fake.run(whole_text(doc, sentences(2, 2, 2), 4, layers=[1, 3]))
    np.testing.assert_array_equal(means, FakeExecutor().run(sentence_by_sentence(new_document(), sentences(2, 2, 2),
                                                                                 4, layers=[1, 3])))
    assert doc.decode_calls == 1 and doc.token_layers == 6 * 4


def test_replay_reads_stored_states_like_the_fake_reads_its_own():
    n_layer, counts = 6, [2, 3, 1]
    states = np.array([[state(k, layer) for layer in range(n_layer)] for k in range(len(counts))])

    def reading(doc: Document):
        first = yield from doc.append([range(counts[0])], 2)
        rest = yield from doc.append([range(n) for n in counts[1:]], 5, stop=lambda layer, means: layer == 3)
        return first + rest

    replayed, doc = replay(reading, states, counts)
    fake = FakeExecutor()
    live_doc = Document(0, sum(counts))
    live = fake.run(reading(live_doc))
    assert [(s.index, s.depth, s.layers) for s in replayed] == [(s.index, s.depth, s.layers) for s in live]
    for a, b in zip(replayed, live):
        np.testing.assert_array_equal(a.means, b.means)
    assert (doc.valid_depths, doc.token_layers, doc.operations) == (live_doc.valid_depths, live_doc.token_layers,
                                                                     live_doc.operations)
    assert doc.valid_depths == (5, 4, 4) and doc.token_layers == 2 * 2 + 2 * 5 + 4 * 4


def test_requests_carry_their_document():
    fake, doc = FakeExecutor(), new_document()
    fake.run(doc.append(sentences(2), 3))
    deepen = doc.deepen_next(5)
    forget = next(deepen)
    assert isinstance(forget, Forget) and forget.doc is doc and forget.position == doc.first_position
