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
from ..heads import Pooling
from ..llama import quantize
from ..models.registry import identify, resolve_model
from ..sentences import Splitter
from ..stats import wilson_interval
from . import lora
from .calibrate import Calibration, Point, calibrate, layer_accuracies, replay
from .data import Splits, make_splits
from .features import FeatureStore, extract, stores_under
from .hf import hf_to_gguf, is_hf_checkpoint
from .settings import ConvertSettings
from .train import train_heads

TFIDF_ROW = f"baseline, no LLM: {TFIDF_DESCRIPTION} on the same training documents"
DEFAULT_PROMPT = "Classify the following text.\nText:"
SENTIMENT_PROMPT = "Classify the sentiment of this movie review as positive or negative.\nReview:"


@dataclass
class ConvertReport:
    bundle: Path
    splits: str
    calibration: Calibration
    test: dict[str, Point]
    test_docs: int
    test_layer_accuracy: dict[str, list[float]]
    tfidf_accuracy: float  # TF-IDF + logistic regression trained on the training split, on the test split
    seconds: dict[str, float]
    lora: lora.LoraReport | None = None

    def interval(self, accuracy: float) -> tuple[float, float]:
        """95% interval of a test accuracy."""
        return wilson_interval(round(accuracy * self.test_docs), self.test_docs)

    def summary(self) -> str:
        lines = [self.splits, "", f"{'policy':13} {'test acc':>9} {'95% interval':>14} {'loss bound':>11} "
                                  f"{'token-layers':>13} {'operations':>11}  parameters"]
        for name, p in self.test.items():
            low, high = self.interval(p.accuracy)
            lines.append(f"{name:13} {p.accuracy:9.3f}   {low:.3f}–{high:.3f} {self.calibration.loss_bound[name]:11.3f} "
                         f"{1 / p.cost:12.2f}× {1 / p.operations:10.2f}×  {p.params}")
        low, high = self.interval(self.tfidf_accuracy)
        lines.append(f"{TFIDF_NAME:13} {self.tfidf_accuracy:9.3f}   {low:.3f}–{high:.3f}  ({TFIDF_ROW})")
        lines.append(f"(speed-ups against full depth; loss bound: on calibration, against the best layer; "
                     f"{self.calibration.describe_target()})")
        if self.lora is not None:
            lines.append(self.lora.describe())
        lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def convert(settings: ConvertSettings) -> ConvertReport:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(settings.work or out / "features")
    splitter = settings.data.make_splitter()
    prompt = settings.prompt or (SENTIMENT_PROMPT if settings.data.data == "imdb" else DEFAULT_PROMPT)

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

    splits = make_splits(settings.data)
    timings["data"] = time.perf_counter() - started

    lora_path, lora_report = None, None
    if settings.finetune is not None:
        lora_path, lora_report = _finetune(settings, model_path, prompt, splitter, splits, out / LORA_FILE,
                                           work / "lora")
        timings["lora"] = time.perf_counter() - started - sum(timings.values())

    stores: dict[str, FeatureStore] = {}
    earlier = stores_under(settings.reuse)
    with Engine.load(model_path, settings.engine, prompt=prompt, lora=lora_path) as engine:
        base = BaseModelRef(registry_name, sha256_file(model_path), engine.architecture, engine.n_layer, engine.n_embd)
        for part in ("train", "calibration", "test"):
            ds = getattr(splits, part)
            stores[part] = extract(engine, ds.texts, ds.labels, splitter, work / part, settings.max_sentences,
                                   reuse=earlier)
    timings["features"] = time.perf_counter() - started - sum(timings.values())

    label_names = splits.train.label_names
    heads = {pooling: train_heads(stores["train"], label_names, pooling, settings.head)[0] for pooling in Pooling.ALL}
    timings["training"] = time.perf_counter() - started - sum(timings.values())

    calibration = calibrate(stores["calibration"], heads, None, settings.tolerance, settings.confidence)
    test = {name: replay(stores["test"], heads, name, point.params) for name, point in calibration.chosen.items()}
    layer_acc = {k: v.round(4).tolist() for k, v in layer_accuracies(stores["test"], heads).items()}
    timings["calibration"] = time.perf_counter() - started - sum(timings.values())
    tfidf = tfidf_logreg().fit(list(splits.train.texts), list(splits.train.labels))
    tfidf_accuracy = float(np.mean(tfidf.predict(list(splits.test.texts)) == np.asarray(splits.test.labels)))
    timings["baseline"] = time.perf_counter() - started - sum(timings.values())

    meets = [n for n in calibration.chosen if calibration.meets_target(n)]
    default = min(meets, key=lambda n: calibration.chosen[n].cost) if meets else "full"
    bundle = Bundle(
        base=base,
        labels=tuple(label_names),
        task_prompt=prompt,
        splitter=splitter,
        heads=heads,
        policies={name: _plain(point.params) for name, point in calibration.chosen.items()},
        default_policy=default,
        calibration=_plain({**calibration.to_json(), "data": asdict(settings.data)}),
        head_kind=settings.head.kind,
        head_hidden=settings.head.hidden if settings.head.kind == "mlp" else 0,
        lora=LoraRef(lora_path.name, sha256_file(lora_path)) if lora_path else None,
    )
    write_bundle(bundle, out)
    report = ConvertReport(out, splits.describe(), calibration, test, len(splits.test), layer_acc, tfidf_accuracy,
                           timings, lora_report)
    (out / MODEL_CARD).write_text(model_card(settings, bundle, report))
    return report


def _finetune(settings: ConvertSettings, model_path: Path, prompt: str, splitter: Splitter, splits: Splits,
              path: Path, checkpoint: Path) -> tuple[Path, lora.LoraReport]:
    """Train a LoRA adapter on the training split (resuming from `checkpoint` after the last epoch saved), write it
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
    rows = "\n".join(
        f"| {name} | {p.accuracy:.3f} | {'–'.join(f'{x:.3f}' for x in report.interval(p.accuracy))} | "
        f"{calibration.chosen[name].accuracy:.3f} | {calibration.loss_bound[name]:.3f} | {1 / p.cost:.2f}× | "
        f"{1 / p.operations:.2f}× | `{json.dumps(p.params)}` |"
        for name, p in report.test.items()
    )
    tfidf_interval = "–".join(f"{x:.3f}" for x in report.interval(report.tfidf_accuracy))
    rows += f"\n| {TFIDF_NAME} ({TFIDF_ROW}) | {report.tfidf_accuracy:.3f} | {tfidf_interval} | | | | | |"
    return f"""# edge2dexit bundle

- base model: {base.name or 'model.gguf in this directory'} ({base.architecture}, {base.n_layer} layers, n_embd {base.n_embd}, sha256 {base.sha256})
- data: {_describe_data(settings)}
- labels: {', '.join(bundle.labels)}
- task prompt: {bundle.task_prompt!r}
- sentence splitter: {bundle.splitter.kind} ({bundle.splitter.language})
- heads: {bundle.head_kind} (hidden {bundle.head_hidden}) per layer, on sentence means and on prefix means
- default policy: {bundle.default_policy}
- fine-tuning: {report.lora.describe() if report.lora else 'none (the base model is frozen; heads only)'}

## Splits

```
{report.splits}
```

## Test split (each policy with its parameters calibrated on the calibration split)

Speed-ups are against reading every token through every layer: token-layers as llama.cpp computes them
(re-decodes included), operations as the paper counts them. Calibration {calibration.describe_target()}.
"Loss bound" is how much accuracy, at most, each policy's point gives up against that layer on calibration
({calibration.confidence:.0%} one-sided; above {calibration.tolerance} means no point of the policy met the target and
its most accurate point was kept). The test interval is a 95% Wilson interval over {report.test_docs} documents.

| policy | test accuracy | 95% interval | calibration accuracy | loss bound | token-layer speed-up | operation speed-up | parameters |
|---|---|---|---|---|---|---|---|
{rows}

Per-layer test accuracy, whole text (sentence head on the last sentence / prefix head on all sentences):

```
{json.dumps(report.test_layer_accuracy)}
```
"""
