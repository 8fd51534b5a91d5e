"""Training the exit heads on stored features: one small classifier per layer and pooling, exported as numpy
`ExitHeads` that the runtime evaluates without torch.

Two poolings (`heads.Pooling`), matching what the runtime reads:
- "sentence": one sentence's mean state, labelled with its document's label (the paper's adapter target);
- "prefix": the running mean of the first k sentence means, for every k (what the `prefix-mean` policy reads as
  the text streams in; evidence accumulated in embedding space beat summed sentence votes: docs/measurements.md).

Each layer's head is trained on its own: inputs standardised with the training set's mean and std (residual
streams reach norms of 35,000 in Gemma), a class-weighted cross-entropy so an unbalanced set does not buy
accuracy with the majority class, AdamW, and early stopping on a validation split *by document* (sentences of
one review are near-duplicates of each other in label evidence; splitting by sentence would leak). Every
layer starts from the same seed, so a layer's head does not depend on which other layers were trained.

torch is imported here and in `lora.py` (the LoRA mode), and only the converter imports either: the runtime never
loads torch (tests/test_imports.py).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..heads import ExitHead, ExitHeads
from .features import Documents
from .settings import TrainSettings


def train_heads(
    documents: Documents, label_names: Sequence[str], pooling: str, settings: TrainSettings = TrainSettings()
) -> tuple[ExitHeads, dict[int, dict[str, float | int]]]:
    """Train one head per layer and return them with a report: for each layer its number of training
    examples, validation accuracy over all examples and over each document's last example (the whole text for
    "prefix", the last sentence for "sentence"), the best validation loss, the epochs run and kept, and
    `export_error`: the largest difference between the exported numpy head's and the torch model's
    validation probabilities."""
    n_classes = len(label_names)
    labels = np.asarray(documents.labels)
    for store, _ in documents.parts:
        if store.done < store.n_docs:
            raise InputError(f"{store.directory} holds features of {store.done} of {store.n_docs} documents; "
                             "finish the extraction first")
    if labels.size == 0 or labels.min() < 0 or labels.max() >= n_classes:
        raise InputError(f"training labels must be class indices in 0..{n_classes - 1} ({', '.join(label_names)})")
    if len(np.unique(labels)) < 2:
        raise InputError(f"every training document has the label {label_names[labels[0]]!r}; training needs at "
                         "least two classes")
    layers = range(documents.n_layer) if settings.layers is None else settings.layers
    if any(not 0 <= layer < documents.n_layer for layer in layers):
        raise InputError(f"exit layers must lie in 0..{documents.n_layer - 1}, got {list(layers)}")
    train_docs, val_docs = split_documents(labels, settings.validation_fraction, settings.seed)
    if len(val_docs) == 0:
        raise InputError(f"{documents.n_docs} training documents are too few to set some aside for validation")

    heads, report = {}, {}
    with torch_threads(settings.threads):
        for layer in layers:
            heads[layer], report[layer] = _train_layer(documents.select(train_docs), documents.select(val_docs),
                                                       pooling, layer, n_classes, settings)
    return ExitHeads(pooling, tuple(label_names), heads), report


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: left as they are)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def split_documents(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) document indices, sorted: `fraction` of each class's documents (at least one
    of each class with two or more) go to validation, so a small set still validates every class."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        docs = rng.permutation(np.flatnonzero(labels == c))
        val.append(docs[: min(max(1, round(fraction * len(docs))), len(docs) - 1)])
    val = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(labels)), val), val


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Cross-entropy class weights that make every class present count as much as the others in total."""
    counts = np.bincount(labels, minlength=n_classes)
    weight = np.where(counts > 0, len(labels) / (np.count_nonzero(counts) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weight, dtype=torch.float32)


def head_module(n_embd: int, n_classes: int, settings: TrainSettings) -> nn.Sequential:
    """The torch twin of an `ExitHead` of `settings.kind` (it reads standardised inputs)."""
    if settings.kind == "linear":
        return nn.Sequential(nn.Linear(n_embd, n_classes))
    return nn.Sequential(nn.Linear(n_embd, settings.hidden), nn.ReLU(), nn.Linear(settings.hidden, n_classes))


def export_head(module: nn.Sequential, layer: int, kind: str, mean: np.ndarray, scale: np.ndarray) -> ExitHead:
    """The numpy `ExitHead` computing what `module` computes on inputs standardised by (mean, scale)."""
    weights = tuple((m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy())
                    for m in module if isinstance(m, nn.Linear))
    return ExitHead(layer, kind, mean, scale, weights)


def _train_layer(
    train: Documents, validation: Documents, pooling: str, layer: int, n_classes: int, settings: TrainSettings,
) -> tuple[ExitHead, dict[str, float | int]]:
    x, y, _, _ = train.examples(pooling, layer)
    x_val, y_val, doc_val, _ = validation.examples(pooling, layer)
    if not (np.isfinite(x).all() and np.isfinite(x_val).all()):
        raise InputError(f"layer {layer} holds non-finite states (float16 overflow?)")
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = (x.std(axis=0, dtype=np.float64) + 1e-6).astype(np.float32)
    # standardised exactly as ExitHead.proba does it, in float32, so the exported head matches the trained one
    x_t = torch.from_numpy((x - mean) / scale)
    x_val_t = torch.from_numpy((x_val - mean) / scale)
    y_t, y_val_t = torch.from_numpy(y.astype(np.int64)), torch.from_numpy(y_val.astype(np.int64))

    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y, n_classes))

    torch.manual_seed(settings.seed)
    module = head_module(x.shape[1], n_classes, settings)
    optimiser = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = torch.Generator().manual_seed(settings.seed)
    best_loss, best_state, best_epoch, epoch = math.inf, None, 0, 0
    for epoch in range(1, settings.epochs + 1):
        for batch in torch.randperm(len(y_t), generator=order).split(settings.batch):
            optimiser.zero_grad()
            loss_fn(module(x_t[batch]), y_t[batch]).backward()
            optimiser.step()
        with torch.no_grad():
            val_loss = loss_fn(module(x_val_t), y_val_t).item()
        if val_loss < best_loss:
            best_loss, best_state, best_epoch = val_loss, copy.deepcopy(module.state_dict()), epoch
        elif epoch - best_epoch >= settings.patience:
            break
    module.load_state_dict(best_state)

    head = export_head(module, layer, settings.kind, mean, scale)
    with torch.no_grad():
        p_val = torch.softmax(module(x_val_t), dim=1).numpy()
    predicted = p_val.argmax(axis=1)
    last = np.r_[doc_val[1:] != doc_val[:-1], True]  # each validation document's last example
    return head, {
        "train_examples": len(y),
        "val_accuracy": float(np.mean(predicted == y_val)),
        "val_accuracy_last": float(np.mean(predicted[last] == y_val[last])),
        "val_loss": best_loss,
        "epochs": epoch,
        "best_epoch": best_epoch,
        # what the runtime will compute, against what was trained: a wrong export shows here, not in a bundle
        "export_error": float(np.abs(head.proba(x_val) - p_val).max()),
    }
