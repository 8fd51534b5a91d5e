"""LoRA fine-tuning (`convert --finetune lora`, the paper's second mode): low-rank adapters (peft) on the base
model's attention projections, trained with the paper's weighted multi-layer loss on prefix-mean states, exported
as a llama.cpp LoRA adapter file that the runtime applies to the untouched base GGUF.

What is trained is the bundle's own GGUF file, dequantized to fp32 by transformers (`gguf_file=`), on llama.cpp's
token streams (the engine tokenizes: torch and llama.cpp read the same tokens). Torch computes the base model in
fp32 where llama.cpp computes with quantized activations; their layer outputs agree to a cosine of ≥ 0.9997
(docs/llama-cpp.md §8), close enough to train an adapter, not to ship heads from. So the torch heads here only shape
the adapter: the bundle's heads are trained afterwards, as always, on the states llama.cpp computes through the
exported adapter, and `verify` checks first that llama.cpp applies the adapter as torch does.

The loss of one document: at each layer, the running means of its sentence means (what the prefix-mean policy
reads), a head per layer, class-weighted cross-entropy averaged over the prefixes; layers weighted as the paper does
(0.8 on the last, 0.1 on each other), normalised to sum to one. The paper puts the heavy weight on the model's last
layer; the policies here exit in the middle (BENCHMARKS §2), so `LoraSettings.depth` can cut the model to the layers
they read: the heavy weight then falls on the exit layer, the layers above stay untouched, and each training step
costs depth / n_layer of a whole one.

Imports torch, transformers and peft: only the converter imports this module.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import gguf
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..bundle import write_lora
from ..document import whole_text
from ..engine import Engine
from ..errors import ContextOverflowError, InputError
from ..files import replacing, write_text
from .settings import LoraSettings, TrainSettings
from .train import class_weights, head_module, split_documents, torch_threads

# transformers un-permutes llama's q/k rows on loading (llama.cpp's RoPE layout, convert_hf_to_gguf.py);
# a LoRA B on those projections must be permuted back on export. Other architectures load unpermuted.
_ROPE_PERMUTED = {"llama": {"q_proj": "n_head", "k_proj": "n_head_kv"}}


@dataclass
class TokenizedDoc:
    ids: list[int]  # task prompt (with BOS) then every sentence's tokens
    spans: list[tuple[int, int]]  # [start, end) of each sentence in `ids`
    label: int


def tokenized(engine: Engine, sentences: Sequence[Sequence[str]], labels: Sequence[int]) -> list[TokenizedDoc]:
    """The token streams `features.extract` decodes, one per document, in torch's terms."""
    docs = []
    for doc, label in zip(sentences, labels):
        ids, spans = list(engine.prompt_tokens), []
        for sentence in doc:
            tokens = engine.tokenize(sentence)
            spans.append((len(ids), len(ids) + len(tokens)))
            ids += tokens
        text_tokens = len(ids) - len(engine.prompt_tokens)
        if text_tokens > engine.capacity:
            raise ContextOverflowError.for_text(text_tokens, engine.capacity)
        docs.append(TokenizedDoc(ids, spans, int(label)))
    return docs


def load_model(model_path: str | Path, settings: LoraSettings) -> nn.Module:
    """The GGUF model in fp32 torch with fresh LoRA adapters (B = 0: the model computes what the base does),
    cut to its first `settings.depth` layers if given."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("LoRA fine-tuning needs peft: pip install 'edge2dexit[train]'") from None
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(model_path)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.requires_grad_(False)
    if settings.depth is not None:  # the layers above are never run, so they get no adapter either
        n_layer = model.config.num_hidden_layers
        if settings.depth > n_layer:
            raise InputError(f"LoRA depth {settings.depth} is deeper than the model's {n_layer} layers")
        model.model.layers = model.model.layers[: settings.depth]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                        lora_dropout=0.0, bias="none")
    with warnings.catch_warnings():  # peft asks a deprecated transformers property; nothing for a user to do
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


class _LayerOutputs:
    """Forward hooks that keep each decoder layer's output (llama.cpp's `l_out-<i>`)."""

    def __init__(self, decoder: nn.Module):
        self.outputs: dict[int, torch.Tensor] = {}
        self._hooks = [layer.register_forward_hook(self._keeper(i)) for i, layer in enumerate(decoder.layers)]

    def _keeper(self, i: int):
        def keep(module, inputs, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return keep

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a peft-wrapped causal LM (its layers, without the output layer we never need)."""
    return model.get_base_model().model


def sentence_means(model: nn.Module, taps: _LayerOutputs, doc: TokenizedDoc) -> torch.Tensor:
    """[n_layer, m, n_embd]: the mean output state of each sentence at each layer."""
    taps.outputs.clear()
    _decoder(model)(input_ids=torch.tensor([doc.ids]))
    states = torch.stack([taps.outputs[i][0] for i in range(len(taps.outputs))])
    return torch.stack([states[:, a:b].mean(dim=1) for a, b in doc.spans], dim=1)


def prefix_means(means: torch.Tensor) -> torch.Tensor:
    """Running means over the sentence axis of [n_layer, m, n_embd] (as `heads.running_means`)."""
    counts = torch.arange(1, means.shape[1] + 1, dtype=means.dtype).view(1, -1, 1)
    return means.cumsum(dim=1) / counts


def layer_weights(n_layer: int, settings: LoraSettings) -> torch.Tensor:
    weights = torch.full((n_layer,), settings.other_weight)
    weights[-1] = settings.last_weight
    return weights / weights.sum()


class _Heads(nn.Module):
    """One auxiliary head per layer on standardised prefix means."""

    def __init__(self, mean: torch.Tensor, scale: torch.Tensor, n_classes: int, head: TrainSettings):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("scale", scale)
        self.layers = nn.ModuleList(head_module(mean.shape[1], n_classes, head) for _ in range(mean.shape[0]))

    def forward(self, prefixes: torch.Tensor) -> torch.Tensor:
        """[n_layer, m, C] logits of [n_layer, m, n_embd] prefix means."""
        x = (prefixes - self.mean[:, None]) / self.scale[:, None]
        return torch.stack([head(x[i]) for i, head in enumerate(self.layers)])


@dataclass
class LoraReport:
    settings: LoraSettings
    documents: int  # training documents the adapter was trained on (validation ones excluded)
    epochs: list[dict[str, float]]  # per epoch: validation loss and whole-text accuracy (mean over layers)
    best_epoch: int
    seconds: float
    adapter_cosine: float | None = None  # `verify`: the adapter's effect in llama.cpp against torch

    def describe(self) -> str:
        s = self.settings
        epochs = "; ".join(f"epoch {e['epoch']}: validation loss {e['val_loss']:.3f}, accuracy "
                           f"{e['val_accuracy_mean_over_layers']:.3f} (mean over layers)" for e in self.epochs)
        cosine = f"{self.adapter_cosine:.4f}" if self.adapter_cosine is not None else "not checked"
        layers = "every layer" if s.depth is None else f"layers 0–{s.depth - 1} (the loss's last weight on {s.depth - 1})"
        return (f"LoRA rank {s.rank} (alpha {s.alpha:g}) on {', '.join(s.targets)} of {layers}, trained on "
                f"{self.documents} documents ({epochs}; kept epoch {self.best_epoch}) in {self.seconds:.0f} s; "
                f"its effect on the states in llama.cpp against torch: cosine {cosine}")


def finetune(
    model_path: str | Path, docs: Sequence[TokenizedDoc], n_classes: int, settings: LoraSettings, head: TrainSettings,
    threads: int | None = None, checkpoint: str | Path | None = None,
) -> tuple[nn.Module, LoraReport]:
    """Train LoRA adapters and auxiliary heads on `docs`; returns the peft model with the adapters of the epoch of
    lowest validation loss (documents set aside by class, as for the heads).

    With `checkpoint` (a directory), the training state is saved there after every epoch and every
    `settings.checkpoint_every` documents within one, and a run with the same model file, settings and documents
    resumes where the last save left off (a finished one trains nothing)."""
    started = time.perf_counter()
    labels = np.array([d.label for d in docs])
    if len(np.unique(labels)) < 2:
        raise InputError("LoRA fine-tuning needs documents of at least two classes")
    train_docs, val_docs = split_documents(labels, settings.validation_fraction, settings.seed)
    if settings.max_documents is not None:
        rng = np.random.default_rng(settings.seed)
        train_docs = np.sort(rng.permutation(train_docs)[: settings.max_documents])
    with torch_threads(threads):
        torch.manual_seed(settings.seed)
        model = load_model(model_path, settings)
        taps = _LayerOutputs(_decoder(model))
        saved = _Checkpoint(Path(checkpoint), _fingerprint(model_path, docs, n_classes, settings, head)) \
            if checkpoint is not None else None
        try:
            return _train(model, taps, docs, train_docs, val_docs, n_classes, settings, head, started, saved)
        finally:
            taps.close()


def _fingerprint(model_path: str | Path, docs: Sequence[TokenizedDoc], n_classes: int, settings: LoraSettings,
                 head: TrainSettings) -> str:
    """What a training run depends on: a checkpoint of another model, settings or documents is never resumed. The
    number of epochs and how often to save are left out, so that a run may go on for more epochs than an earlier one
    trained."""
    from ..cache import sha256_file

    trained = {k: v for k, v in asdict(settings).items() if k not in ("epochs", "checkpoint_every")}
    digest = hashlib.sha256(json.dumps([sha256_file(model_path), n_classes, trained, asdict(head)],
                                       default=str).encode())
    for doc in docs:
        digest.update(np.asarray([doc.label, len(doc.ids), *doc.ids, *np.ravel(doc.spans)], dtype=np.int64).tobytes())
    return digest.hexdigest()


class _Checkpoint:
    """The training state, in a directory: `state.pt` (tensors only, read back with weights_only=True) and
    `meta.json` (the run's fingerprint, the epochs done and the documents done of the next, the history). Each file
    is replaced whole (`files`), the state first, so an interrupted save leaves the previous meta pointing at a
    state at least as new, and at most the documents since then are trained again."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = directory, fingerprint
        self._state, self._meta = directory / "state.pt", directory / "meta.json"

    def load(self) -> tuple[dict, dict] | None:
        """(meta, state) of the last save of this very run, or None."""
        try:
            meta = json.loads(self._meta.read_text())
        except (OSError, ValueError):
            return None
        if meta.get("fingerprint") != self.fingerprint or not self._state.exists():
            return None
        return meta, torch.load(self._state, weights_only=True)

    def save(self, epoch: int, step: int, history: list[dict], best: tuple[float, int], seconds: float,
             state: dict) -> None:
        """`epoch` epochs done, and `step` documents of the next."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with replacing(self._state) as part:
            torch.save(state, part)
        meta = {"fingerprint": self.fingerprint, "epoch": epoch, "step": step, "history": history,
                "best_loss": best[0], "best_epoch": best[1], "seconds": seconds}
        write_text(self._meta, json.dumps(meta))


def _train(model: nn.Module, taps: _LayerOutputs, docs: Sequence[TokenizedDoc], train_docs: np.ndarray,
           val_docs: np.ndarray, n_classes: int, settings: LoraSettings, head: TrainSettings,
           started: float, checkpoint: _Checkpoint | None) -> tuple[nn.Module, LoraReport]:
    with torch.no_grad():  # standardisation from the base model's states (B = 0 still)
        sample = [prefix_means(sentence_means(model, taps, docs[i])) for i in train_docs[: settings.stats_documents]]
    flat = torch.cat(sample, dim=1)
    heads = _Heads(flat.mean(dim=1), flat.std(dim=1) + 1e-6, n_classes, head)
    weights = layer_weights(flat.shape[0], settings)
    class_weight = class_weights(np.array([docs[i].label for i in train_docs]), n_classes)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW([{"params": lora_params, "lr": settings.lr},
                                   {"params": heads.parameters(), "lr": settings.head_lr}], weight_decay=0.0)

    def loss_of(doc: TokenizedDoc) -> tuple[torch.Tensor, torch.Tensor]:
        logits = heads(prefix_means(sentence_means(model, taps, doc)))  # [n_layer, m, C]
        target = torch.full((logits.shape[1],), doc.label)
        per_layer = torch.stack([nn.functional.cross_entropy(l, target, weight=class_weight) for l in logits])
        return (weights * per_layer).sum(), logits[:, -1].argmax(dim=1) == doc.label

    order = np.random.default_rng(settings.seed)
    history, best = [], (math.inf, 0, None)
    first, skip = 1, 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        meta, state = resumed
        model.load_state_dict(state["lora"], strict=False)
        heads.load_state_dict(state["heads"])
        optimiser.load_state_dict(state["optimiser"])
        history, first, skip = meta["history"], meta["epoch"] + 1, meta.get("step", 0)
        started -= meta["seconds"]  # the report counts the training time of every run
        best = (meta["best_loss"], meta["best_epoch"], state["best_lora"])
        for _ in range(meta["epoch"]):  # the document orders of the epochs done, so that the next one is the same
            order.permutation(train_docs)
        at = f"{skip} documents into epoch {first}" if skip else f"epoch {meta['epoch']}"
        print(f"LoRA: resumed after {at} from {checkpoint.directory}", file=sys.stderr)

    def save(epoch: int, step: int) -> None:
        state = {"lora": _lora_state(model), "heads": heads.state_dict(), "optimiser": optimiser.state_dict(),
                 "best_lora": best[2]}
        checkpoint.save(epoch, step, history, best[:2], time.perf_counter() - started, state)

    # a save within an epoch falls on an optimiser step, where no gradient is pending
    every = max(1, settings.checkpoint_every // settings.batch) * settings.batch
    for epoch in range(first, settings.epochs + 1):
        model.train()
        start = skip if epoch == first else 0
        permutation = order.permutation(train_docs)
        for step, i in enumerate(tqdm(permutation[start:], desc=f"LoRA epoch {epoch}", unit="doc", file=sys.stderr,
                                      disable=None), start=start + 1):
            (loss_of(docs[i])[0] / settings.batch).backward()
            if step % settings.batch == 0 or step == len(train_docs):
                optimiser.step()
                optimiser.zero_grad()
                if checkpoint is not None and step % every == 0 and step < len(train_docs):
                    save(epoch - 1, step)
        model.eval()
        with torch.no_grad():
            results = [loss_of(docs[i]) for i in val_docs]
        val_loss = float(torch.stack([r[0] for r in results]).mean())
        accuracy = float(torch.stack([r[1] for r in results]).float().mean())
        history.append({"epoch": epoch, "val_loss": val_loss, "val_accuracy_mean_over_layers": accuracy})
        if val_loss < best[0]:
            best = (val_loss, epoch, _lora_state(model))
        if checkpoint is not None:
            save(epoch, 0)
    model.load_state_dict(best[2], strict=False)
    return model, LoraReport(settings, len(train_docs), history, best[1], time.perf_counter() - started)


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the adapters' weights (what an epoch changes)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def to_gguf_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a q/k projection output from transformers' order to llama.cpp's (the inverse of transformers'
    `_reverse_permute_weights`): within each head, the two rotary halves interleaved."""
    half = b.shape[0] // n_head // 2
    return b.reshape(n_head, 2, half, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def adapter_pairs(model: nn.Module, architecture: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """The trained adapters as llama.cpp tensors: {base tensor name: (A, B)} and llama.cpp's alpha."""
    from peft.tuners.lora import Linear as LoraLinear

    config = model.get_base_model().config
    n_layer = config.num_hidden_layers
    names = gguf.get_tensor_name_map(_gguf_arch(architecture), n_layer)
    heads = {"n_head": config.num_attention_heads, "n_head_kv": config.num_key_value_heads}
    pairs, alphas = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        hf_name = name.removeprefix("base_model.model.")
        base = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
        if base is None:
            raise InputError(f"no llama.cpp tensor for {hf_name} of {architecture}")
        a = module.lora_A["default"].weight.detach().numpy()
        b = module.lora_B["default"].weight.detach().numpy()
        permuted = _ROPE_PERMUTED.get(architecture, {}).get(hf_name.rsplit(".", 1)[-1])
        if permuted is not None:
            b = to_gguf_rows(b, heads[permuted])
        pairs[base] = (a, b)
        alphas.add(module.scaling["default"] * module.r["default"])  # llama.cpp scales by alpha / rank
    if len(alphas) != 1:
        raise InputError(f"expected one LoRA scaling for every module, got {sorted(alphas)}")
    return pairs, alphas.pop()


def _gguf_arch(architecture: str) -> gguf.MODEL_ARCH:
    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == architecture:
            return arch
    raise InputError(f"gguf-py does not know the architecture {architecture!r}")


def export(model: nn.Module, architecture: str, path: str | Path) -> Path:
    pairs, alpha = adapter_pairs(model, architecture)
    return write_lora(path, architecture, pairs, alpha)


def verify(model: nn.Module, base: Engine, adapted: Callable[[float], Engine], docs: Sequence[TokenizedDoc],
           effect: float = 0.25, minimum_cosine: float = 0.97) -> float:
    """Check that llama.cpp applies the exported adapter as torch does: the change the adapter makes to a
    document's sentence means at every layer (adapted − base), in torch and in llama.cpp, must point the same way.

    torch and llama.cpp compute the base model ~1% apart (quantized activations), as much as a lightly trained
    adapter changes the states; so the adapter is applied at a scale where its change is `effect` (25%) of the
    states in both, where that noise bends the comparison to a cosine of ~0.998 while a wrong export (e.g. q rows
    in the wrong order) gives ~0.9 or less. `adapted(scale)` opens an engine with the exported adapter at that
    scale. Returns the smallest cosine over `docs`; raises below `minimum_cosine`."""
    taps = _LayerOutputs(_decoder(model))
    try:
        with torch.no_grad():
            with model.disable_adapter():
                torch_base = [sentence_means(model, taps, doc).numpy() for doc in docs]
            change = np.linalg.norm(sentence_means(model, taps, docs[0]).numpy() - torch_base[0])
            if change == 0:
                raise InputError("LoRA training left the adapter at zero: it changes nothing (learning rate 0?)")
            scale = max(1.0, effect * np.linalg.norm(torch_base[0]) / change)
            with _scaled(model, scale):
                torch_adapted = [sentence_means(model, taps, doc).numpy() for doc in docs]
    finally:
        taps.close()
    cosines = []
    with adapted(scale) as engine:
        for doc, t_base, t_adapted in zip(docs, torch_base, torch_adapted):
            sentences = [doc.ids[a:b] for a, b in doc.spans]
            depth = len(t_base)  # torch's model may be cut to the layers LoRA trained
            l_base, l_adapted = (e.run(whole_text(e.document(), sentences, depth)).transpose(1, 0, 2)
                                 for e in (base, engine))
            t, l = (t_adapted - t_base).ravel(), (l_adapted - l_base).ravel()
            cosines.append(float(t @ l / (np.linalg.norm(t) * np.linalg.norm(l))))
    worst = min(cosines)
    if worst < minimum_cosine:
        raise InputError(f"llama.cpp does not apply the exported LoRA adapter as torch computed it (cosine of the "
                         f"adapter's effect {worst:.3f} < {minimum_cosine}); this architecture's export needs work")
    return worst


@contextmanager
def _scaled(model: nn.Module, factor: float) -> Iterator[None]:
    """Every LoRA update of `model` multiplied by `factor` (llama.cpp's per-context adapter scale, in peft)."""
    from peft.tuners.lora import Linear as LoraLinear

    modules = [m for m in model.modules() if isinstance(m, LoraLinear)]
    for m in modules:
        m.scaling["default"] *= factor
    try:
        yield
    finally:
        for m in modules:
            m.scaling["default"] /= factor
