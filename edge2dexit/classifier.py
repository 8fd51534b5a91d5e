"""The public API: a bundle + an engine + a policy → a `Result`.

    with Classifier() as clf:                       # the default bundle and its base model
        result = clf.classify(open("review.txt").read())
        print(result.label, result.scores)
        clf("Great film.")                          # [{"label": "positive", "score": 0.97}]

    with Classifier(policy="ours").stream() as stream:   # sentences as they arrive
        for sentence in transcript:
            if (result := stream.feed(sentence)) is not None:
                break                               # decided early
        else:
            result = stream.finish()
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .bundle import Bundle, load_bundle
from .engine import Document, Engine, EngineSettings
from .errors import ContextOverflowError, InputError
from .files import sha256_file
from .models.registry import resolve_model
from .policies import Decision, Policy, PolicyStream, make_policy

DEFAULT_BUNDLE = Path(__file__).parent / "models" / "default"


@dataclass(frozen=True)
class Result:
    label: str
    scores: dict[str, float]
    policy: str
    exit_sentence: int  # 0-based index of the sentence whose evidence decided
    exit_layer: int  # 0-based layer of the head that decided
    early: bool  # an exit rule fired before the whole text was read at full depth
    sentences_read: int
    sentences_total: int  # sentences in the text (after truncation, if any)
    layers_run: int  # deepest pass computed
    operations: int  # (sentence, layer) cells computed, as the paper counts them
    token_layers: int  # tokens × layers llama.cpp really computed, re-decodes included
    tokens: int  # tokens of text read
    seconds: float  # wall time of the classification (splitting, tokenizing, reading, deciding)
    truncated: bool = False  # the text did not fit the context and its tail was not read

    def as_pipeline(self) -> list[dict[str, Any]]:
        """`[{"label": …, "score": …}]`, best first, as common text-classification pipelines return."""
        return [{"label": k, "score": v} for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Classifier:
    """Loads a bundle and its base model once; classifies any number of texts. Close it (or use `with`)."""

    def __init__(
        self,
        bundle: str | Path | Bundle | None = None,
        model: str | Path | None = None,
        policy: str | None = None,
        settings: EngineSettings = EngineSettings(),
        truncate: bool = False,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle or DEFAULT_BUNDLE)
        self.model_path = resolve_model(model or self.bundle.model_file or self.bundle.base.name)
        self.truncate = truncate
        self.engine = Engine(self.model_path, settings, prompt=self.bundle.task_prompt)
        try:
            self.bundle.check_base(
                sha256_file(self.model_path), self.engine.architecture, self.engine.n_layer, self.engine.n_embd
            )
            self.policy_name = policy or self.bundle.default_policy
            self.policy = self.make_policy(self.policy_name)
        except BaseException:
            self.engine.close()
            raise

    def make_policy(self, name: str) -> Policy:
        return make_policy(name, self.bundle.heads, self.engine.n_layer, self.bundle.policy_params(name))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.bundle.labels)

    def classify(self, text: str, policy: str | None = None) -> Result:
        started = time.perf_counter()
        sentences = self.bundle.splitter.split(_check_text(text))
        tokens = self.engine.tokenize_sentences(sentences)
        tokens, truncated = self._fit(tokens)
        name = policy or self.policy_name
        doc = self.engine.document()
        decision = self._policy(name).run(doc, tokens)
        return self._result(name, decision, doc, len(tokens), started, truncated)

    def __call__(self, texts: str | Sequence[str]) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        if isinstance(texts, str):
            return self.classify(texts).as_pipeline()
        return [self.classify(t).as_pipeline() for t in texts]

    def stream(self, policy: str | None = None) -> "Stream":
        """Feed sentences one by one; see `Stream`. Only one stream or classification runs at a time."""
        name = policy or self.policy_name
        return Stream(self, name, self._policy(name))

    def _policy(self, name: str) -> Policy:
        """The bundle's default policy is built once; others when asked for."""
        return self.policy if name == self.policy_name else self.make_policy(name)

    def _fit(self, tokens: list[list[int]]) -> tuple[list[list[int]], bool]:
        """The sentences that fit the context: all, or with truncation the longest prefix that fits."""
        capacity, used = self.engine.capacity, 0
        for k, t in enumerate(tokens):
            used += len(t)
            if used > capacity:
                if not self.truncate or k == 0:
                    total = sum(map(len, tokens))
                    raise ContextOverflowError(
                        f"the text is {total} tokens but the context leaves room for {capacity} after the task "
                        f"prompt: raise the context size (--n-ctx) or read only what fits (--truncate)"
                    )
                return tokens[:k], True
        return tokens, False

    def _result(
        self, name: str, decision: Decision, doc: Document, total: int, started: float, truncated: bool
    ) -> Result:
        scores = {label: float(p) for label, p in zip(self.bundle.labels, decision.probabilities)}
        return Result(
            label=self.bundle.labels[decision.label_index],
            scores=scores,
            policy=name,
            exit_sentence=decision.exit_sentence,
            exit_layer=decision.exit_layer,
            early=decision.fired and (decision.sentences_read < total or decision.exit_layer < self.engine.n_layer - 1),
            sentences_read=decision.sentences_read,
            sentences_total=total,
            layers_run=max(doc.valid_depths + (0,)),
            operations=doc.operations,
            token_layers=doc.token_layers,
            tokens=doc.n_tokens,
            seconds=time.perf_counter() - started,
            truncated=truncated,
        )

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Stream:
    """Sentences as they arrive (a live chat, a transcript): `feed` returns a Result as soon as the policy is
    confident, else None; `finish` decides on what was read. `ours` and `sentence` decide while reading;
    `paper2d` needs the sentence count up front (its Δ = L/m), so like `full` and `layer` it decides at
    `finish`. A text may be fed in pieces: each piece is split into sentences first."""

    def __init__(self, classifier: Classifier, name: str, policy: Policy):
        self.classifier, self.name = classifier, name
        self.doc = classifier.engine.document()
        self._policy_stream: PolicyStream = policy.stream(self.doc)
        self._fed = 0
        self._started = time.perf_counter()
        self.truncated = False
        self.result: Result | None = None

    def feed(self, text: str) -> Result | None:
        if self.result is not None:
            return self.result
        clf = self.classifier
        for tokens in clf.engine.tokenize_sentences(clf.bundle.splitter.split(text)):
            if self.truncated or self._fed + len(tokens) > clf.engine.capacity:
                if not clf.truncate:
                    raise ContextOverflowError(
                        f"the stream outgrew the context ({clf.engine.capacity} tokens after the task prompt)"
                        ": raise the context size or allow truncation"
                    )
                self.truncated = True
                return None
            self._fed += len(tokens)
            decision = self._policy_stream.feed(tokens)
            if decision is not None:
                self.result = clf._result(self.name, decision, self.doc, decision.sentences_read, self._started, False)
                return self.result
        return None

    def finish(self) -> Result:
        if self.result is None:
            if self._fed == 0:
                raise InputError("the stream ended before any sentence arrived")
            decision = self._policy_stream.finish()
            n = decision.sentences_read
            self.result = self.classifier._result(self.name, decision, self.doc, n, self._started, self.truncated)
        return self.result

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        pass


def _check_text(text: str) -> str:
    if "\x00" in text:
        raise InputError("the input looks binary (it contains NUL bytes), not text")
    if not text.strip():
        raise InputError("the text is empty")
    return text
