"""Feature stores copy the documents earlier stores of the same source hold (`extract(..., reuse=)`, `convert
--reuse`): the copy equals a fresh read, only the documents no store holds are read, and a store of another source
(model file, prompt, adapter) lends nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import edge2dexit.convert.features as features
from edge2dexit.convert.features import document_key, extract, open_store, stores_under
from edge2dexit.errors import InputError
from edge2dexit.sentences import Splitter
from helpers import REVIEWS
from helpers import tiny_convert

pytestmark = pytest.mark.llama


@pytest.fixture
def reads(monkeypatch):
    """The documents extraction reads through the engine (copies are not reads), by their first token."""
    read = []
    whole_text = features.whole_text

    def counting(doc, tokens, n_layer):
        read.append(tokens[0][0])
        return whole_text(doc, tokens, n_layer)

    monkeypatch.setattr(features, "whole_text", counting)
    return read


def test_a_new_store_reads_only_what_earlier_stores_lack_and_equals_a_fresh_read(smollm2_engine, tmp_path, reads):
    splitter, labels = Splitter(), [1, 0, 1, 0, 1]
    earlier = extract(smollm2_engine, REVIEWS[:3], labels[:3], splitter, tmp_path / "earlier", max_sentences=4)
    fresh = extract(smollm2_engine, REVIEWS[1:], labels[1:], splitter, tmp_path / "fresh", max_sentences=4)
    assert len(reads) == 3 + 4
    reads.clear()
    grown = extract(smollm2_engine, REVIEWS[1:], labels[1:], splitter, tmp_path / "grown", max_sentences=4,
                    reuse=stores_under([tmp_path / "earlier"]))
    assert len(reads) == 2  # REVIEWS[1] and [2] were copied
    assert grown.done == 4 and grown.keys == fresh.keys
    np.testing.assert_array_equal(grown.offsets, fresh.offsets)
    np.testing.assert_array_equal(grown.tokens, fresh.tokens)
    np.testing.assert_array_equal(grown.states, fresh.states)  # one engine at width 1 reads bit for bit the same
    np.testing.assert_array_equal(grown.document(0)[0], earlier.document(1)[0])
    assert open_store(tmp_path / "grown").keys == grown.keys  # kept in meta.json for the next store to copy from


def test_a_store_of_another_source_lends_nothing(smollm2_engine, tmp_path, reads):
    splitter = Splitter()
    earlier = extract(smollm2_engine, REVIEWS[:2], [1, 0], splitter, tmp_path / "earlier", max_sentences=4)
    other_prompt = dataclasses.replace(earlier, source={**earlier.source, "prompt_tokens": [1, 2, 3]})
    old_store = dataclasses.replace(earlier, keys=[])  # written before stores kept document keys
    reads.clear()
    extract(smollm2_engine, REVIEWS[:2], [1, 0], splitter, tmp_path / "again", max_sentences=4,
            reuse=[other_prompt, old_store])
    assert len(reads) == 2


def test_document_keys_see_where_sentences_end():
    assert document_key([[1, 2], [3]]) != document_key([[1], [2, 3]])
    assert document_key([[1, 2], [3]]) == document_key([np.array([1, 2]), (3,)])


def test_reuse_of_a_folder_without_stores_is_refused(tmp_path):
    with pytest.raises(InputError, match="holds no feature stores"):
        stores_under([tmp_path])


def test_a_convert_into_a_new_folder_reads_nothing_an_earlier_convert_read(smollm2_path, tmp_path, reads):
    (tmp_path / "first").mkdir(), (tmp_path / "second").mkdir()
    first = tiny_convert(tmp_path / "first", smollm2_path)
    read_first = len(reads)
    reads.clear()
    second = tiny_convert(tmp_path / "second", smollm2_path, reuse=(first.bundle / "features",))
    assert read_first > 0 and reads == []
    assert second.test == first.test  # the same documents, the same split: the same bundle
