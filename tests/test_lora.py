"""LoRA fine-tuning mode on the real SmolLM2: the adapter file llama.cpp loads, the export's row order checked
against torch, a tiny `convert --finetune lora` whose bundle classifies through the adapter with torch blocked,
and the refusals of a bundle whose adapter is missing or altered. (The engine's exactness tests also run through
a LoRA adapter: conftest's `any_engine`.)"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from typer.testing import CliRunner

from edge2dexit import Classifier
from edge2dexit.bundle import LORA_FILE, load_bundle
from edge2dexit.cli import app
from edge2dexit.convert import lora
from edge2dexit.convert.settings import LoraSettings
from edge2dexit.document import whole_text
from edge2dexit.engine import Engine, EngineSettings
from edge2dexit.errors import BundleError, InputError, ModelError
from edge2dexit.keys import FORMAT_VERSION, Keys
from edge2dexit.sentences import Splitter

from helpers import REVIEW, TASK_PROMPT, random_lora
from helpers import TEXT, tiny_convert

pytestmark = pytest.mark.llama


def read(model, lora=None, text=REVIEW):
    """States [sentences, layers, n_embd] of `text` read whole, through `lora` if given."""
    with Engine.load(model, EngineSettings(n_ctx=512), prompt=TASK_PROMPT, lora=lora) as engine:
        tokens = [engine.tokenize(s) for s in Splitter().split(text)]
        return engine.run(whole_text(engine.document(), tokens, engine.n_layer))


def test_a_zero_adapter_changes_nothing_and_a_random_one_every_layer(smollm2_path, lora_path, tmp_path):
    base = read(smollm2_path)
    zero = random_lora(smollm2_path, tmp_path / "zero.gguf", zero=True)
    np.testing.assert_array_equal(read(smollm2_path, zero), base)  # llama.cpp adds exact zeros
    changed = np.abs(read(smollm2_path, lora_path) - base).max(axis=(0, 2))
    assert (changed > 1e-3).all()


def test_llama_cpp_refuses_an_adapter_for_another_model(gemma_path, lora_path):
    with pytest.raises(ModelError, match="could not load the LoRA adapter"):
        Engine.load(gemma_path, EngineSettings(n_ctx=256), lora=lora_path)


def test_export_puts_q_rows_in_llama_cpp_order():
    """`to_gguf_rows` undoes what transformers does to llama's q/k rows on loading a GGUF."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    gguf_rows = np.random.default_rng(0).normal(size=(576, 8))
    hf_rows = LlamaTensorProcessor()._reverse_permute_weights(gguf_rows, 9, 9)
    assert not np.array_equal(hf_rows, gguf_rows)
    np.testing.assert_array_equal(lora.to_gguf_rows(hf_rows, 9), gguf_rows)


def test_verify_passes_a_right_export_and_catches_a_wrong_one(smollm2_path, tmp_path, monkeypatch):
    """llama.cpp and torch agree on the adapter's effect when q's rows are exported in llama.cpp's order; in
    transformers' order, the check refuses the adapter."""
    torch.manual_seed(0)
    model = lora.load_model(smollm2_path, LoraSettings(rank=4))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 1e-3)
    path = tmp_path / LORA_FILE
    with Engine.load(smollm2_path, EngineSettings(n_ctx=256), prompt=TASK_PROMPT) as base:
        docs = lora.tokenized(base, [Splitter().split(REVIEW)[:3]], [1])

        def adapted(scale):
            return Engine.load(smollm2_path, EngineSettings(n_ctx=256), prompt=TASK_PROMPT, lora=path, lora_scale=scale)

        lora.export(model, "llama", path)
        assert lora.verify(model, base, adapted, docs) > 0.99
        monkeypatch.setattr(lora, "_ROPE_PERMUTED", {})
        lora.export(model, "llama", path)
        with pytest.raises(InputError, match="does not apply the exported LoRA adapter"):
            lora.verify(model, base, adapted, docs)


def test_an_adapter_trained_to_a_depth_adapts_those_layers_only(smollm2_path, tmp_path):
    """`LoraSettings.depth` cuts torch's model to the layers the policies read: the adapter file holds those layers
    only, and llama.cpp applies it there as torch does."""
    torch.manual_seed(0)
    model = lora.load_model(smollm2_path, LoraSettings(rank=4, depth=3))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 1e-3)
    path = lora.export(model, "llama", tmp_path / LORA_FILE)
    assert {int(t.name.split(".")[1]) for t in GGUFReader(path).tensors} == {0, 1, 2}
    with Engine.load(smollm2_path, EngineSettings(n_ctx=256), prompt=TASK_PROMPT) as base:
        docs = lora.tokenized(base, [Splitter().split(REVIEW)[:3]], [1])
        assert lora.verify(model, base, lambda scale: Engine.load(
            smollm2_path, EngineSettings(n_ctx=256), prompt=TASK_PROMPT, lora=path, lora_scale=scale), docs) > 0.99
    with pytest.raises(InputError, match="deeper than the model's 30 layers"):
        lora.load_model(smollm2_path, LoraSettings(depth=31))


@pytest.fixture(scope="module")
def lora_bundle(tmp_path_factory, smollm2_path):
    return tiny_convert(tmp_path_factory.mktemp("lora-convert"), smollm2_path,
                        finetune=LoraSettings(rank=4, epochs=1, batch=4, stats_documents=4))


def test_lora_convert_writes_a_bundle_with_an_adapter_that_changes_the_states(lora_bundle, smollm2_path):
    directory = lora_bundle.bundle
    bundle = load_bundle(directory)
    assert bundle.lora.file == LORA_FILE and bundle.lora_file() == directory / LORA_FILE
    reader = GGUFReader(directory / "exits.gguf")
    assert reader.fields[Keys.Exits.FORMAT_VERSION.name].contents() == FORMAT_VERSION
    assert reader.fields[Keys.Exits.LORA_FILE.name].contents() == LORA_FILE
    adapter = GGUFReader(directory / LORA_FILE)
    assert adapter.fields[Keys.Adapter.TYPE.name].contents() == "lora"
    assert {t.name for t in adapter.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.29.attn_v.weight.lora_b"}
    assert lora_bundle.lora.adapter_cosine >= 0.97 and lora_bundle.lora.documents > 0
    changed = np.abs(read(smollm2_path, directory / LORA_FILE, TEXT) - read(smollm2_path, text=TEXT))
    assert changed.max() > 1e-3
    assert "LoRA rank 4" in (directory / "README.md").read_text()


def test_lora_bundle_classifies_where_torch_cannot_be_imported(lora_bundle):
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'peft'): sys.modules[name] = None\n"
        "from edge2dexit import Classifier, EngineSettings\n"
        f"with Classifier({str(lora_bundle.bundle)!r}, settings=EngineSettings(n_ctx=512)) as clf:\n"
        "    print(clf.engine.context.lora.path.name, clf.classify(" + repr(TEXT) + ").label)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    adapter, label = result.stdout.split()
    assert adapter == LORA_FILE and label in ("neg", "pos")


def test_a_bundle_whose_adapter_is_missing_or_altered_is_refused(lora_bundle, tmp_path):
    copy = shutil.copytree(lora_bundle.bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns("features"))
    adapter = copy / LORA_FILE
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1
    adapter.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="not the LoRA adapter the heads were trained with"):
        Classifier(copy)
    adapter.unlink()
    with pytest.raises(BundleError, match="needs its LoRA adapter lora.gguf"):
        Classifier(copy)
    text = tmp_path / "review.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(app, ["classify", str(text), "--bundle", str(copy)])
    assert result.exit_code == BundleError.exit_code and "needs its LoRA adapter" in result.output


def test_training_resumes_after_the_last_checkpoint(smollm2_path, tmp_path, capfd):
    """An interrupted training (one of two epochs; cut off within an epoch) goes on from its checkpoint and ends
    where an uninterrupted run ends; a finished one trains nothing more."""
    from edge2dexit.convert.settings import TrainSettings

    with Engine.load(smollm2_path, EngineSettings(n_ctx=256), prompt=TASK_PROMPT) as base:
        sentences = Splitter().split(REVIEW)
        docs = lora.tokenized(base, [sentences[i:i + 2] for i in range(6)], [0, 1, 0, 1, 0, 1])
    settings = LoraSettings(rank=2, epochs=2, batch=2, stats_documents=2, depth=2, validation_fraction=0.3)

    def train(epochs, checkpoint=None):
        model, report = lora.finetune(smollm2_path, docs, 2, LoraSettings(**{**settings.__dict__, "epochs": epochs}),
                                      TrainSettings(hidden=4), threads=1, checkpoint=checkpoint)
        return lora.adapter_pairs(model, "llama")[0], report

    def assert_resumed_to(adapter, report, message):
        assert message in capfd.readouterr().err
        assert [e["epoch"] for e in report.epochs] == [1, 2]
        for name, (a, b) in straight.items():
            np.testing.assert_allclose(adapter[name][0], a, atol=1e-6)
            np.testing.assert_allclose(adapter[name][1], b, atol=1e-6)

    straight, _ = train(2)
    train(1, tmp_path / "lora")
    resumed, report = train(2, tmp_path / "lora")
    assert_resumed_to(resumed, report, "resumed after epoch 1")
    again, report = train(2, tmp_path / "lora")  # finished: nothing left to train, the same adapter comes back
    assert "resumed after epoch 2" in capfd.readouterr().err
    np.testing.assert_array_equal(again[next(iter(again))][1], resumed[next(iter(resumed))][1])

    # cut off within the first epoch, after its first optimiser step (a save every batch of 2 documents)
    calls = 0
    step = torch.optim.AdamW.step

    def cut_off(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    settings = LoraSettings(**{**settings.__dict__, "checkpoint_every": 2})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", cut_off)
        with pytest.raises(KeyboardInterrupt):
            train(2, tmp_path / "cut")
    within, report = train(2, tmp_path / "cut")
    assert_resumed_to(within, report, "resumed after 2 documents into epoch 1")
