"""Prompt tokenisation: the checkpoint tokenizer path, the labelled stand-in, and prompt validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import attrs
import pytest

from llm_perf_opt.errors import InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.tokenizer import (
    DEFAULT_PROMPT,
    DEFAULT_PROMPT_IDS_AFTER_IMAGE,
    HFPromptTokenizer,
    PromptTokenizer,
    StandInTokenizer,
    load_tokenizer,
    split_prompt,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REAL_CFG = DeepseekOCRConfig()
TINY_CFG = DeepseekOCRConfig.from_json(FIXTURES / "deepseek_ocr_tiny" / "config.json")
PROMPT_REF = json.loads((FIXTURES / "deepseek_ocr_real" / "image_tokens.json").read_text())["_prompt"]


def test_default_prompt_constants_match_fixture() -> None:
    assert PROMPT_REF["text"] == DEFAULT_PROMPT
    assert list(DEFAULT_PROMPT_IDS_AFTER_IMAGE) == PROMPT_REF["ids_after_image"]


def test_stand_in_real_vocab_default_prompt() -> None:
    tok = load_tokenizer(None, REAL_CFG)
    assert isinstance(tok, StandInTokenizer) and isinstance(tok, PromptTokenizer)
    assert tok.is_stand_in and "not meaningful" in tok.name
    ids = tok.encode_prompt(DEFAULT_PROMPT)
    assert ids == [128815, *PROMPT_REF["ids_after_image"]]
    assert tok.decode(ids[1:]) == "".join(PROMPT_REF["tokens_after_image"]).replace("\\n", "\n")
    assert tok.decode([0, 128815, 1]) == "<｜begin▁of▁sentence｜><image><｜end▁of▁sentence｜>"
    # Surrounding whitespace is stripped like the reference's plain template does.
    assert tok.encode_prompt("  " + DEFAULT_PROMPT + "\n") == ids


def test_stand_in_bytes_stay_in_vocab_and_avoid_specials() -> None:
    tok = load_tokenizer(None, TINY_CFG)
    assert isinstance(tok, StandInTokenizer)
    ids = tok.encode_prompt(DEFAULT_PROMPT)
    assert ids[0] == TINY_CFG.image_token_id and ids.count(TINY_CFG.image_token_id) == 1
    text_ids = ids[1:]
    assert all(0 <= i < TINY_CFG.language.vocab_size for i in text_ids)
    assert not {0, 1, 500} & set(text_ids)
    assert len(text_ids) == len(DEFAULT_PROMPT.split("<image>")[1].encode())
    assert tok.encode_prompt(DEFAULT_PROMPT) == ids  # deterministic
    assert tok.decode(text_ids) == DEFAULT_PROMPT.split("<image>")[1]
    assert tok.decode([0, *tok.encode_prompt("é ok", with_image=False), 1, 499]) == "<bos>é ok<eos><499>"

    real = StandInTokenizer.for_model(REAL_CFG)
    other = real.encode_prompt("Free OCR. <image>")
    assert other[-1] == 128815 and not set(other[:-1]) & {0, 1, 128815, *DEFAULT_PROMPT_IDS_AFTER_IMAGE}
    assert real.decode(other[:-1]) == "Free OCR. "


def test_stand_in_tiny_vocab_wraps() -> None:
    tok = StandInTokenizer(vocab_size=10, bos_id=0, eos_id=1, image_token_id=9)
    ids = tok.encode_prompt("hello", with_image=False)
    assert all(2 <= i <= 8 for i in ids)


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ("Convert the document to markdown.", "no <image>"),
        ("", "no <image>"),
        ("<image> and <image>", "2 <image>"),
    ],
)
def test_prompt_validation(prompt: str, match: str) -> None:
    tok = load_tokenizer(None, TINY_CFG)
    with pytest.raises(InputError, match=match) as info:
        tok.encode_prompt(prompt)
    assert info.value.hint


def test_split_prompt_without_image() -> None:
    assert split_prompt(" hi ", with_image=False) == ("hi", None)
    with pytest.raises(InputError, match="no image"):
        split_prompt("<image>\nhi", with_image=False)
    assert split_prompt("a<image>b") == ("a", "b")


def test_load_tokenizer_dirs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(tmp_path / "missing", REAL_CFG)
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(tmp_path, REAL_CFG)
    assert isinstance(tok, StandInTokenizer)
    assert "stand-in" in caplog.text


def test_checkpoint_tokenizer_via_autotokenizer(tmp_path: Path) -> None:
    """A directory with tokenizer files goes through transformers.AutoTokenizer (no remote code)."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<eos>": 1, "convert": 2, "the": 3, "page": 4, ".": 5, "<image>": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
    backend.decoder = tokenizers.decoders.WordPiece()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "<eos>"})
    )
    cfg = attrs.evolve(TINY_CFG, image_token_id=6)
    tok = load_tokenizer(tmp_path, cfg)
    assert isinstance(tok, HFPromptTokenizer) and not tok.is_stand_in
    ids = tok.encode_prompt("<image> convert the page .")
    assert ids == [6, 2, 3, 4, 5]
    assert tok.encode_prompt("the <image> page") == [3, 6, 4]
    assert tok.decode([2, 3, 4]) == "convert the page"
    with pytest.raises(InputError):
        tok.encode_prompt("convert the page")


def test_broken_tokenizer_files(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text("{ not json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        load_tokenizer(tmp_path, REAL_CFG)
