"""`edge2dexit convert`: labelled text + a base model → a bundle.

data → deterministic train / calibration / test splits → [with `finetune`: a LoRA adapter trained on train,
lora.gguf] → features through the runtime engine (full depth, every layer, each text in one decode, through the
adapter if any) → one exit head per layer and head set (sentence, prefix) trained on train → every policy
calibrated on calibration → every policy measured on test, beside TF-IDF + logistic regression trained on the same
documents → exits.gguf + model card.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..baselines import TFIDF_DESCRIPTION, TFIDF_NAME, tfidf_logreg
from ..bundle import LORA_FILE, MODEL_CARD, MODEL_FILE, BaseModelRef, Bundle, LoraRef, write_bundle
from ..cache import sha256_file
from ..engine import Engine
from ..files import write_text
from ..heads import Pooling, margin
from ..lexical import VOCABULARY_CAP, fit_lexical
from ..llama import quantize
from ..models.registry import identify, resolve_model
from ..sentences import Splitter
from ..policies import policy_class
from ..stats import wilson_interval
from . import lora
from .calibrate import (TRUST_BOUND, Calibration, Point, TrustCalibration, calibrate, calibrate_trust,
                        layer_accuracies, replay, replay_documents)
from .data import Splits, make_splits
from .features import FeatureStore, extract, stores_under
from .hf import hf_to_gguf, is_hf_checkpoint
from .settings import DEFAULT_PROMPT, SENTIMENT_PROMPT, ConvertSettings
from .train import train_heads

TFIDF_ROW = f"baseline, no LLM: {TFIDF_DESCRIPTION} on the same training documents"


@dataclass
class ConvertReport:
    bundle: Path
    splits: str
    calibration: Calibration
    test: dict[str, Point]  # each policy as chosen, behind the lexical exit where it has a threshold
    test_without_lexical: dict[str, Point]  # each policy with no lexical exit, at its parameters for that
    test_docs: int
    test_layer_accuracy: dict[str, list[float]]
    tfidf_accuracy: float  # TF-IDF + logistic regression trained on the training split, on the test split
    lexical_accuracy: float | None  # the bundle's lexical head alone on the test split
    trust: TrustCalibration | None  # the default policy's abstention and prediction sets, on calibration
    trust_test: list[dict[str, Any]]  # the same, measured on the test split
    seconds: dict[str, float]
    lora: lora.LoraReport | None = None

    def interval(self, accuracy: float) -> tuple[float, float]:
        """95% interval of a test accuracy."""
        return wilson_interval(round(accuracy * self.test_docs), self.test_docs)

    def summary(self) -> str:
        lines = [self.splits, "", f"{'policy':13} {'test acc':>9} {'95% interval':>14} {'loss bound':>11} "
                                  f"{'token-layers':>13} {'operations':>11} {'lexical':>8}  parameters"]
        for name, p in self.test.items():
            low, high = self.interval(p.accuracy)
            lines.append(f"{name:13} {p.accuracy:9.3f}   {low:.3f}–{high:.3f} {self.calibration.loss_bound[name]:11.3f} "
                         f"{_speedup(p.cost):>13} {_speedup(p.operations):>11} {p.lexical_share:8.1%}  {p.params}"
                         + (f", words at ≥ {p.lexical_threshold}" if p.lexical_threshold is not None else ""))
        for name, accuracy in ((TFIDF_NAME, self.tfidf_accuracy), ("lexical head", self.lexical_accuracy)):
            if accuracy is not None:
                low, high = self.interval(accuracy)
                lines.append(f"{name:13} {accuracy:9.3f}   {low:.3f}–{high:.3f}  "
                             f"({TFIDF_ROW if name == TFIDF_NAME else LEXICAL_ROW})")
        lines.append(f"(speed-ups against full depth; lexical: share answered by the words alone; loss bound: on "
                     f"calibration, against the reference; {self.calibration.describe_target()})")
        for row in self.trust_test:
            lines.append(f"abstention at α = {row['error_rate']:.0%} ({self.trust.trust.policy}): margin "
                         f"{row['margin']}, test coverage {row['coverage']:.3f}, error among answered "
                         f"{_figure(row['error'])}")
        if self.lora is not None:
            lines.append(self.lora.describe())
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


LEXICAL_ROW = "the bundle's lexical exit alone: " + TFIDF_DESCRIPTION + f", {VOCABULARY_CAP:,} n-grams at most"


def _speedup(cost: float) -> str:
    """A relative cost as a speed-up; a point that reads nothing (the words answered everything) is infinitely fast."""
    return f"{1 / cost:.2f}×" if cost > 0 else "∞"


def _figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def convert(settings: ConvertSettings) -> ConvertReport:
    """The whole conversion: the base model as the bundle will read it, the data's splits, then `build`."""
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, registry_name = _base_model(settings, out)
    splits = make_splits(settings.data)
    return build(settings, splits, model_path, registry_name, {"data": time.perf_counter() - started})


def _base_model(settings: ConvertSettings, out: Path) -> tuple[Path, str]:
    """The GGUF file the bundle is read with, and its registry name ("" for a file that ships in the bundle)."""
    if is_hf_checkpoint(settings.model):  # converted to f16, then re-quantized into the bundle if asked
        source = hf_to_gguf(settings.model, out / (MODEL_FILE if settings.quant == "keep" else "model-f16.gguf"))
    else:
        source = resolve_model(settings.model)
    model_path, registry_name = source, identify(source) or ""
    if settings.quant != "keep":
        model_path = out / MODEL_FILE
        quantize(source, model_path, settings.quant, settings.engine.n_threads)
        registry_name = ""
        if source.parent == out:  # the f16 conversion was only a step
            source.unlink()
    elif not registry_name:
        model_path = out / MODEL_FILE
        if source.resolve() != model_path.resolve():
            shutil.copyfile(source, model_path)
    return model_path, registry_name


def build(settings: ConvertSettings, splits: Splits, model_path: Path, registry_name: str,
          timings: dict[str, float] | None = None) -> ConvertReport:
    """Train, calibrate and write a bundle from `splits`, read through `model_path`: [a LoRA adapter] → features
    through the runtime engine → exit heads and the lexical head → every policy calibrated behind the lexical exit →
    the default policy's abstention and prediction sets → every figure on the test split → exits.gguf + model card."""
    timings = dict(timings or {})
    started = time.perf_counter() - sum(timings.values())

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - started - sum(timings.values())

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(settings.work or out / "features")
    splitter = settings.data.make_splitter()
    prompt = settings.prompt or (SENTIMENT_PROMPT if settings.data.data == "imdb" else DEFAULT_PROMPT)

    lora_path, lora_report = None, None
    if settings.finetune is not None:
        lora_path, lora_report = _finetune(settings, model_path, prompt, splitter, splits, out / LORA_FILE,
                                           work / "lora")
        lap("lora")

    stores: dict[str, FeatureStore] = {}
    earlier = stores_under(settings.reuse)
    with Engine.load(model_path, settings.engine, prompt=prompt, lora=lora_path) as engine:
        base = BaseModelRef(registry_name, sha256_file(model_path), engine.architecture, engine.n_layer, engine.n_embd)
        for part in ("train", "calibration", "test"):
            ds = getattr(splits, part)
            stores[part] = extract(engine, ds.texts, ds.labels, splitter, work / part, settings.max_sentences,
                                   reuse=earlier)
    lap("features")

    label_names = splits.train.label_names
    heads = {pooling: train_heads(stores["train"], label_names, pooling, settings.head)[0] for pooling in Pooling.ALL}
    lexical = fit_lexical(splits.train.texts, splits.train.labels, len(label_names), seed=settings.head.seed) \
        if settings.lexical else None
    words = {part: None if lexical is None else np.stack([lexical.proba(t) for t in getattr(splits, part).texts])
             for part in ("calibration", "test")}
    lap("training")

    calibration = calibrate(stores["calibration"], heads, None, settings.tolerance, settings.confidence,
                            words["calibration"])
    meets = [n for n in calibration.chosen if calibration.meets_target(n)]
    default = min(meets, key=lambda n: calibration.chosen[n].cost) if meets else "full"
    chosen = calibration.chosen[default]
    trust = calibrate_trust(stores["calibration"], heads, default, chosen.params, words["calibration"],
                            chosen.lexical_threshold, settings.confidence)
    test = {name: replay(stores["test"], heads, name, p.params, words["test"], p.lexical_threshold)
            for name, p in calibration.chosen.items()}
    without = {name: replay(stores["test"], heads, name, calibration.llm_only.get(name, p).params)
               for name, p in calibration.chosen.items()}
    trust_test = trust_on(stores["test"], heads, trust, chosen, words["test"])
    layer_acc = {k: v.round(4).tolist() for k, v in layer_accuracies(stores["test"], heads).items()}
    lap("calibration")
    tfidf = tfidf_logreg().fit(list(splits.train.texts), list(splits.train.labels))
    tfidf_accuracy = float(np.mean(tfidf.predict(list(splits.test.texts)) == np.asarray(splits.test.labels)))
    lexical_accuracy = None if lexical is None else float(np.mean(words["test"].argmax(1) == splits.test.labels))
    lap("baseline")

    bundle = Bundle(
        base=base,
        labels=tuple(label_names),
        task_prompt=prompt,
        splitter=splitter,
        heads=heads,
        policies={name: _plain(point.params) for name, point in calibration.chosen.items()},
        default_policy=default,
        calibration=_plain({**calibration.to_json(), "data": asdict(settings.data), "trust": trust.to_json()}),
        head_kind=settings.head.kind,
        head_hidden=settings.head.hidden if settings.head.kind == "mlp" else 0,
        lora=LoraRef(lora_path.name, sha256_file(lora_path)) if lora_path else None,
        lexical=lexical,
        lexical_thresholds={name: p.lexical_threshold for name, p in calibration.chosen.items()} if lexical else {},
        llm_only_policies={name: _plain(p.params) for name, p in calibration.llm_only.items()},
        trust=trust.trust,
    )
    write_bundle(bundle, out)
    report = ConvertReport(out, splits.describe(), calibration, test, without, len(splits.test), layer_acc,
                           tfidf_accuracy, lexical_accuracy, trust, trust_test, timings, lora_report)
    write_text(out / MODEL_CARD, model_card(settings, bundle, report))
    return report


def trust_on(store: FeatureStore, heads, trust: TrustCalibration, chosen: Point,
             lexical: np.ndarray | None) -> list[dict[str, Any]]:
    """The default policy's abstention at each calibrated α, measured on `store` (the test split): coverage, and the
    error among the answered documents with its 95% Wilson interval."""
    floor = policy_class(trust.trust.policy).margin_floor
    rows = []
    for abstention in trust.abstention:
        m = abstention.margin
        params = {**chosen.params, floor: m} if floor is not None and m is not None else chosen.params
        replayed = replay_documents(store, heads, trust.trust.policy, params).cascade(lexical, chosen.lexical_threshold)
        answered = margin(replayed.probabilities) >= (m if m is not None else np.inf)
        errors = int((replayed.probabilities[answered].argmax(1) != store.labels[answered]).sum())
        n = int(answered.sum())
        rows.append({"error_rate": abstention.error_rate, "margin": m, "coverage": n / store.n_docs,
                     "error": errors / n if n else None,
                     "error_interval": list(wilson_interval(errors, n)) if n else None,
                     "cost": float(replayed.token_layers.sum() / (replayed.tokens.sum() * replayed.n_layer))})
    return rows


def _finetune(settings: ConvertSettings, model_path: Path, prompt: str, splitter: Splitter, splits: Splits,
              path: Path, checkpoint: Path) -> tuple[Path, lora.LoraReport]:
    """Train a LoRA adapter on the training split (resuming from `checkpoint` where its last save left off), write it
    to `path`, and check that llama.cpp applies it as torch trained it."""
    train = splits.train
    with Engine.load(model_path, settings.engine, prompt=prompt) as base:
        sentences = [splitter.split(text)[: settings.max_sentences] for text in train.texts]
        docs = lora.tokenized(base, sentences, train.labels)
        model, report = lora.finetune(model_path, docs, len(train.label_names), settings.finetune, settings.head,
                                      settings.engine.n_threads, checkpoint)
        lora.export(model, base.architecture, path)
        report.adapter_cosine = lora.verify(
            model, base, lambda scale: Engine.load(model_path, settings.engine, prompt=prompt, lora=path,
                                                   lora_scale=scale), docs[:2])
    return path, report


def _describe_data(settings: ConvertSettings) -> str:
    data = settings.data
    size = f"{data.per_class} documents per class" if data.per_class is not None else "every document"
    read = f"at most {settings.max_sentences} read per document" if settings.max_sentences else "all of them read"
    return f"{data.data}; {size}, at least {data.min_sentences} sentences, {read}; seed {data.seed}"


def _plain(value: Any) -> Any:
    """JSON-safe copy (numpy scalars become Python numbers)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def model_card(settings: ConvertSettings, bundle: Bundle, report: ConvertReport) -> str:
    base = bundle.base
    calibration = report.calibration

    def interval(accuracy: float) -> str:
        return "–".join(f"{x:.3f}" for x in report.interval(accuracy))

    rows = "\n".join(
        f"| {name} | {p.accuracy:.3f} | {interval(p.accuracy)} | {report.test_without_lexical[name].accuracy:.3f} | "
        f"{calibration.chosen[name].accuracy:.3f} | {calibration.loss_bound[name]:.3f} | {_speedup(p.cost)} | "
        f"{_speedup(p.operations)} | {_threshold(p.lexical_threshold)} | {p.lexical_share:.1%} | "
        f"{_figure(p.lexical_accuracy)} | `{json.dumps(p.params)}` |"
        for name, p in report.test.items()
    )
    rows += f"\n| {TFIDF_NAME} ({TFIDF_ROW}) | {report.tfidf_accuracy:.3f} | {interval(report.tfidf_accuracy)} |" \
            + " |" * 9
    if report.lexical_accuracy is not None:
        rows += f"\n| lexical head ({LEXICAL_ROW}) | {report.lexical_accuracy:.3f} | " \
                f"{interval(report.lexical_accuracy)} |" + " |" * 9
    llm_only = ""
    if calibration.llm_only:
        lines = "\n".join(
            f"| {name} | {p.accuracy:.3f} | {interval(p.accuracy)} | {calibration.llm_only[name].accuracy:.3f} | "
            f"{calibration.llm_only_loss_bound[name]:.3f} | {_speedup(p.cost)} | "
            f"`{json.dumps(calibration.llm_only[name].params)}` |"
            for name, p in report.test_without_lexical.items())
        llm_only = f"""
## Without the words (`--no-lexical`)

Each policy reading every text, with the parameters calibrated for that by the same rule, held to the best single
layer as a bundle without the words would be (behind the words a policy is calibrated on the documents they leave,
and may read too little for the others).

| policy | test accuracy | 95% interval | calibration accuracy | loss bound | token-layer speed-up | parameters |
|---|---|---|---|---|---|---|
{lines}
"""
    trust = ""
    if report.trust is not None:
        lines = "\n".join(
            f"| {a.error_rate:.0%} | {_figure(a.margin)} | {a.coverage:.3f} | {_figure(a.error)} | "
            f"{_figure(a.error_bound)} | {t['coverage']:.3f} | {_figure(t['error'])} | "
            + ("–".join(f"{x:.3f}" for x in t["error_interval"]) if t["error_interval"] else "—") + " |"
            for a, t in zip(report.trust.abstention, report.trust_test))
        sets = ", ".join(f"{c:.0%}: 1 − p ≤ {_figure(q)}" for c, q in report.trust.trust.conformal.items())
        trust = f"""
## Unsure answers ({report.trust.trust.policy}, `--max-error α`)

For each target error rate α, the margin (p_top1 − p_top2) below which the classifier answers "unsure": among the
documents it answers, the error is at most α with {report.trust.confidence:.0%} confidence over the
{report.trust.n_docs} calibration documents ({TRUST_BOUND}). Below the margin, the policy reads on instead of stopping.
A margin of "—" means no margin keeps the promise on this calibration split: every answer is then "unsure".

| α | margin | calibration coverage | calibration error | its upper bound | test coverage | test error | test 95% interval |
|---|---|---|---|---|---|---|---|
{lines}

Prediction sets (`--coverage`, split conformal prediction on the calibration answers): {sets}.
"""
    return f"""# edge2dexit bundle

- base model: {base.name or 'model.gguf in this directory'} ({base.architecture}, {base.n_layer} layers, n_embd {base.n_embd}, sha256 {base.sha256})
- data: {_describe_data(settings)}
- labels: {', '.join(bundle.labels)}
- task prompt: {bundle.task_prompt!r}
- sentence splitter: {bundle.splitter.kind} ({bundle.splitter.language})
- heads: {bundle.head_kind} (hidden {bundle.head_hidden}) per layer, on sentence means and on prefix means
- lexical exit: {'TF-IDF word 1–2-grams + logistic regression, ' + f'{len(bundle.lexical.vocabulary):,} n-grams' if bundle.lexical else 'none'}
- default policy: {bundle.default_policy}
- fine-tuning: {report.lora.describe() if report.lora else 'none (the base model is frozen; heads only)'}

## Splits

```
{report.splits}
```

## Test split (each policy with its parameters calibrated on the calibration split)

Speed-ups are against reading every token through every layer: token-layers as llama.cpp computes them
(re-decodes included; a document the words alone answered costs none), operations as the paper counts them.
Calibration {calibration.describe_target()}. "Loss bound" is how much accuracy, at most, each policy's point gives
up against that reference on calibration ({calibration.confidence:.0%} one-sided; above {calibration.tolerance} means no point of
the policy met the target and its most accurate point was kept). "Words at" is the lexical threshold: where the
lexical head's top probability reaches it, the words alone answer ("—": never); "answered by the words" is the share
of test documents they answered and "accuracy there" its accuracy. "Without the words" is the policy reading every
text, with its parameters for that (`--no-lexical`, next table). The test interval is a 95% Wilson interval over {report.test_docs} documents.

| policy | test accuracy | 95% interval | without the words | calibration accuracy | loss bound | token-layer speed-up | operation speed-up | words at | answered by the words | accuracy there | parameters |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}
{llm_only}{trust}
Per-layer test accuracy, whole text (sentence head on the last sentence / prefix head on all sentences):

```
{json.dumps(report.test_layer_accuracy)}
```
"""


def _threshold(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"
