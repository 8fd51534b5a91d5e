"""The model card a convert writes beside the bundle (README.md): what the bundle is, and every figure measured on its
test split — each policy, the baselines, how honest the default's probabilities are, where its early exits go wrong,
and what it can promise."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from ..baselines import TFIDF_DESCRIPTION, TFIDF_NAME
from ..bundle import Bundle
from ..lexical import VOCABULARY_CAP
from ..trust import BEHIND_WORDS
from .calibrate import COVERAGES, TRUST_PROCEDURE
from .settings import ConvertSettings

if TYPE_CHECKING:
    from .pipeline import ConvertReport

TFIDF_ROW = f"baseline, no LLM: {TFIDF_DESCRIPTION} on the same training documents"
LEXICAL_ROW = "the bundle's lexical exit alone: " + TFIDF_DESCRIPTION + f", {VOCABULARY_CAP:,} n-grams at most"


def speedup(cost: float) -> str:
    """A relative cost as a speed-up; a point that reads nothing (the words answered everything) is infinitely fast."""
    return f"{1 / cost:.2f}×" if cost > 0 else "∞"


def figure(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def describe_data(settings: ConvertSettings) -> str:
    data = settings.data
    size = f"{data.per_class} documents per class" if data.per_class is not None else "every document"
    read = f"at most {settings.max_sentences} read per document" if settings.max_sentences else "all of them read"
    return f"{data.data}; {size}, at least {data.min_sentences} sentences, {read}; seed {data.seed}"


def model_card(settings: ConvertSettings, bundle: Bundle, report: ConvertReport) -> str:
    base = bundle.base
    return f"""# edge2dexit bundle

- base model: {base.name or 'model.gguf in this directory'} ({base.architecture}, {base.n_layer} layers, n_embd {base.n_embd}, sha256 {base.sha256})
- data: {describe_data(settings)}
- labels: {', '.join(bundle.labels)}
- task prompt: {bundle.task_prompt!r}
- sentence splitter: {bundle.splitter.kind} ({bundle.splitter.language})
- heads: {bundle.head_kind} (hidden {bundle.head_hidden}) per layer, on sentence means and on prefix means, each with a temperature fitted on calibration documents (probabilities that mean what they say)
- lexical exit: {'TF-IDF word 1–2-grams + logistic regression, ' + f'{len(bundle.lexical.vocabulary):,} n-grams' if bundle.lexical else 'none'}
- default policy: {bundle.default_policy}
- fine-tuning: {report.lora.describe() if report.lora else 'none (the base model is frozen; heads only)'}

## Splits

```
{report.splits}
```

Training: {report.method}. The documents so read are halved: {report.choose_docs} fitted the scales and chose every
operating point, {report.certify_docs} certified what `--max-error` and `--coverage` promise (they chose nothing).
{_figures_from(report)}
{_policies(report)}{_without_words(report)}{_honesty(report)}{_flips(report)}{_trust(report)}
Per-layer test accuracy, whole text (sentence head on the last sentence / prefix head on all sentences):

```
{json.dumps(report.test_layer_accuracy)}
```
"""


def _figures_from(report: ConvertReport) -> str:
    if report.cross_validated:
        return ("**No test split: every figure below is cross-validated**, measured on the out-of-fold reads of the "
                f"{report.certify_docs} certifying documents (read by heads that were not trained on them, at points "
                "chosen on the other half).")
    return f"Every figure below is measured on the {report.test_docs} documents of the test split, read by the heads shipped."


def _interval(report: ConvertReport, accuracy: float) -> str:
    return "–".join(f"{x:.3f}" for x in report.interval(accuracy))


def _threshold(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _policies(report: ConvertReport) -> str:
    calibration = report.calibration
    rows = "\n".join(
        f"| {name} | {p.accuracy:.3f} | {_interval(report, p.accuracy)} | "
        f"{report.test_without_lexical[name].accuracy:.3f} | {calibration.chosen[name].accuracy:.3f} | "
        f"{calibration.loss_bound[name]:.3f} | {speedup(p.cost)} | {speedup(p.operations)} | "
        f"{_threshold(p.lexical_threshold)} | {p.lexical_share:.1%} | {figure(p.lexical_accuracy)} | "
        f"`{json.dumps(p.params)}` |"
        for name, p in report.test.items())
    if report.tfidf_accuracy is not None:
        rows += f"\n| {TFIDF_NAME} ({TFIDF_ROW}) | {report.tfidf_accuracy:.3f} | " \
                f"{_interval(report, report.tfidf_accuracy)} |" + " |" * 9
    if report.lexical_accuracy is not None:
        rows += f"\n| lexical head ({LEXICAL_ROW}) | {report.lexical_accuracy:.3f} | " \
                f"{_interval(report, report.lexical_accuracy)} |" + " |" * 9
    return f"""
## Test split (each policy with its parameters calibrated on the calibration split)

Speed-ups are against reading every token through every layer: token-layers as llama.cpp computes them
(re-decodes included; a document the words alone answered costs none), operations as the paper counts them.
Calibration {calibration.describe_target()}. "Loss bound" is how much accuracy, at most, each policy's point gives
up against that reference on calibration ({calibration.confidence:.0%} one-sided; above {calibration.tolerance} means no
point of the policy met the target and its most accurate point was kept). "Words at" is the lexical threshold: where
the words' top calibrated probability reaches it, they answer alone ("—": never; elsewhere their evidence is weighed
into the LLM's answer); "answered by the words" is the share of test documents they answered and "accuracy there"
its accuracy. "Without the words" is the policy reading every text with the LLM alone, at its parameters for that
(`--no-lexical`, next table). The test interval is a 95% Wilson interval over {report.test_docs} documents.

| policy | test accuracy | 95% interval | without the words | calibration accuracy | loss bound | token-layer speed-up | operation speed-up | words at | answered by the words | accuracy there | parameters |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}
"""


def _without_words(report: ConvertReport) -> str:
    calibration = report.calibration
    if not calibration.llm_only:
        return ""
    rows = "\n".join(
        f"| {name} | {p.accuracy:.3f} | {_interval(report, p.accuracy)} | {calibration.llm_only[name].accuracy:.3f} | "
        f"{calibration.llm_only_loss_bound[name]:.3f} | {speedup(p.cost)} | "
        f"`{json.dumps(calibration.llm_only[name].params)}` |"
        for name, p in report.test_without_lexical.items())
    return f"""
## Without the words (`--no-lexical`)

Each policy reading every text with the LLM alone, with the parameters calibrated for that by the same rule, held to
the best single layer as a bundle without the words would be (behind the words a policy is calibrated on the
documents they leave, and may read too little for the others).

| policy | test accuracy | 95% interval | calibration accuracy | loss bound | token-layer speed-up | parameters |
|---|---|---|---|---|---|---|
{rows}
"""


def _honesty(report: ConvertReport) -> str:
    sections = []
    for reading, answers in report.answers.items():
        routes = "; ".join(f"{'the words' if route == 'words' else 'the LLM'} answered {n}, right {accuracy:.3f} of "
                           f"the time, showing {confidence:.3f} on average" for route, (n, accuracy, confidence)
                           in answers.routes.items())
        bins = {lower: (mean, n, accuracy) for lower, mean, n, accuracy in answers.reliability}
        raw = {lower: (mean, n, accuracy) for lower, mean, n, accuracy in answers.reliability_raw}
        rows = "\n".join(f"| {lower:.1f}–{lower + 0.1:.1f} | {_bin(raw.get(lower))} | {_bin(bins.get(lower))} |"
                         for lower in sorted(set(bins) | set(raw)))
        sections.append(f"""
### The default ({report.trust[reading].policy}) read {reading}

Expected calibration error (10 bins) of its answers on the {answers.n_docs} test documents: **{answers.ece:.3f}**
calibrated, {answers.ece_raw:.3f} as the heads and words computed them (the same answers). By who answered:
{routes}.

| top probability | before its scale: answers, mean, accuracy | calibrated: answers, mean, accuracy |
|---|---|---|
{rows}
""")
    return "\n## Probabilities that mean what they say\n" + "".join(sections)


def _bin(row: tuple[float, int, float] | None) -> str:
    return "—" if row is None else f"{row[1]}, {row[0]:.3f}, {row[2]:.3f}"


def _flips(report: ConvertReport) -> str:
    sections = []
    for reading, answers in report.answers.items():
        rows = "\n".join(f"| {_sentences(f.first, f.last)} | {f.exits} | {f.flipped} | "
                         f"{f.flipped / f.exits:.1%} | {figure(f.flipped_confidence)} |" for f in answers.flips)
        sections.append(f"""
Read {reading}:

| exit at sentence | answers | flipped | flip rate | their mean top probability |
|---|---|---|---|---|
{rows}
""")
    return f"""
## Early exits against reading to the end

On the test split, by the sentence the default exited at: how many answers, how many were wrong where reading to the
end was right ("flipped"; reading to the end: the same policy at the same layer without stopping early), and how sure
those wrong answers said they were.
{''.join(sections)}"""


def _sentences(first: int, last: int) -> str:
    if first == 0:
        return "the words (none read)"
    return str(first) if first == last else f"{first}+" if last > 1000 else f"{first}–{last}"


def _trust(report: ConvertReport) -> str:
    sections = []
    for reading, trust in report.trust.items():
        first = trust.tests[0]
        rows = "\n".join(
            f"| {row['error_rate']:g} | " + ("cannot promise | | | | |" if row["margin"] is None else
                                            f"{row['margin']:g} | {row['bound']:.3f} | {row['coverage']:.3f} | "
                                            f"{figure(row['error'])} | "
                                            + "–".join(f"{x:.3f}" for x in row["error_interval"]) + " |")
            for row in report.answers[reading].abstention)
        option = "" if reading == BEHIND_WORDS else " `--no-lexical`"
        sections.append(f"""
### Read {reading}{option}

The lowest error this bundle can promise read so is **{first.bound:.3f}**, answering {first.answered / trust.n_docs:.0%}
of the certification documents (margin {first.margin:g}); `--max-error` below it is refused.

| α | margin | certified bound | test coverage | test error | test 95% interval |
|---|---|---|---|---|---|
{rows}
""")
    return f"""
## Unsure answers (`--max-error α`, any α in (0, 1)) and prediction sets (`--coverage`)

Procedure: {TRUST_PROCEDURE}. Confidence {next(iter(report.trust.values())).confidence:.0%}. Below its margin, the
policy reads on instead of stopping. Prediction sets are calibrated at coverages {', '.join(f'{c:g}' for c in COVERAGES)}
(the smallest at or above the one asked for is used).
{''.join(sections)}"""
