"""Shared fixtures: tiny random-weight VLMs of the real classes, saved and re-loaded like a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from vlmrel_core.samples.catalog import FAMILIES, SampleCatalog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLES = SampleCatalog.locate(check=False)  # tests that need shipped files fail naming the missing path


def greedy_generation(model, tokenizer) -> None:
    """Generation settings every tiny test model shares: greedy, stopping at the tokenizer's EOS."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False


def word_level_tokenizer(
    extra_vocab: list[str], *, special: list[str], eos: str, pad: str, bos: str | None = None, bos_on_every_text: bool = False
):
    """A deterministic word-level fast tokenizer (no network): the demo vocabulary, then a family's own tokens.

    ``bos_on_every_text`` mimics Llama-3's tokenizer, which adds BOS to every encoded text.
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from vlmrel_core.demo_models.build import demo_vocabulary

    words = [w for w in demo_vocabulary() if w not in {"<image>", "<s>", "</s>", "<pad>"}]
    vocab = {w: i for i, w in enumerate(words + list(extra_vocab))}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    if bos_on_every_text:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {"bos_token": bos} if bos is not None else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token=eos, pad_token=pad, additional_special_tokens=special, **named
    )
    tokenizer.add_tokens(["\n"])
    return tokenizer


def save_checkpoint(model, processor, path: Path) -> Path:
    """Save like a real checkpoint, so tests load it through the same path (`load_vlm`)."""
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from vlmrel_core.demo_models.build import build_demo_model

    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for family in FAMILIES:
        model, processor = build_demo_model(family, seed=3)
        dirs[family] = save_checkpoint(model, processor, root / family)
    return dirs


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dirs: dict[str, Path]):
    from vlmrel_core.engine.loading import load_vlm

    return {family: load_vlm(path) for family, path in tiny_model_dirs.items()}


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vlmrel_core.data.shapes import write_split

    root = tmp_path_factory.mktemp("shapes")
    return write_split(root, "adversarial", n_images=12)
