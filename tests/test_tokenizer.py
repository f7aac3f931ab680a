"""CLIP tokenizer: id-for-id against OpenAI's reference BPE, shipped files, padding and truncation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ldznet_ext.sd import tokenizer as tok
from ldznet_ext.sd.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, tokenize, tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    # plain
    "a photo of a cat",
    "a dog",
    "the red car on the left",
    "person",
    "a man riding a horse on the beach at sunset",
    # casing
    "A Photo Of A Cat",
    "THE RED CAR",
    "McDonald's iPhone eBay",
    "CamelCaseWordsTogether",
    # punctuation
    "a cat, a dog, and a bird.",
    "what is this?!",
    "(masterpiece:1.2), [cat], {dog}",
    "cat|dog",
    "a 'quoted' word and a \"double quoted\" one",
    "email@example.com / path/to/file.png",
    "... --- ;;; !!!",
    "100% cotton shirt & jeans #ootd",
    "<lora:detail:0.5> portrait",
    # numbers
    "1920s car",
    "3 apples and 12 oranges",
    "version 2.0.1",
    "123456789",
    "4k 8k uhd",
    # whitespace
    "  leading and trailing spaces  ",
    "many     spaces    between",
    "tab\tseparated\tvalues",
    "new\nline and\r\nwindows line",
    "\u00a0non-breaking\u00a0space",
    "   ",
    # apostrophes and contractions
    "it's the cat's toy",
    "don't won't can't",
    "they're we've I'm you'll he'd",
    "IT'S LOUD",
    "rock 'n' roll",
    # hyphens and dashes
    "well-known state-of-the-art",
    "x-ray t-shirt",
    "an en–dash and an em—dash",
    # accents and other scripts
    "café crème brûlée",
    "naïve façade jalapeño",
    "Ångström Übermensch",
    "straße",
    "Ελληνικά γράμματα",
    "ΟΔΟΣ",  # final sigma: needs Python's context-aware lower(), not a per-character one
    "русский текст",
    "עברית",
    "العربية",
    "हिन्दी",
    "cafe\u0301 decomposed",
    "İstanbul",
    # CJK
    "猫",
    "一只猫在沙发上",
    "東京タワー",
    "한국어 문장",
    # emoji
    "a cat 🐱",
    "🔥🔥🔥",
    "👩‍👩‍👧 family",
    "thumbs up 👍🏽",
    # ftfy repairs: curly quotes, ligatures, full width, mojibake
    "don’t “quote” me",
    "ﬁsh and ﬂowers",
    "Ｆｕｌｌ ｗｉｄｔｈ",
    "cafÃ© mojibake",
    # HTML entities in text without '<': ftfy unescapes them (repeatedly), as OpenAI's cleaner does
    "salt &amp; pepper",
    "&lt;tag&gt;",
    "caf&eacute;",
    "&amp;amp; x",
    # special tokens written in the text
    "<|startoftext|>hello<|endoftext|>",
    # longer than 75 content tokens
    "a photo of " + "a very " * 40 + "large cat",
    ", ".join(["masterpiece", "best quality", "ultra detailed"] * 12),
]


@pytest.fixture(scope="module")
def openai_bpe():
    # Load clip/simple_tokenizer.py by path: `import clip` pulls in pkg_resources, which recent
    # setuptools no longer ships, and the tokenizer module needs nothing from the package.
    spec = importlib.util.find_spec("clip")
    assert spec is not None, "OpenAI's `clip` package (clip-anytorch) is a test dependency; run ./dev test"
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def openai_row(openai_bpe, prompt: str) -> list[int]:
    content = openai_bpe.encode(prompt)[: MAX_LENGTH - 2]
    row = [BOS_ID, *content, EOS_ID]
    return row + [EOS_ID] * (MAX_LENGTH - len(row))


def test_prompt_list_covers_enough_cases():
    assert len(PROMPTS) >= 50


@pytest.mark.filterwarnings("ignore:prompt .* tokens but CLIP reads 75")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_match_openai_reference(openai_bpe, prompt):
    assert tokenize([prompt])[0].tolist() == openai_row(openai_bpe, prompt)


@pytest.mark.filterwarnings("ignore:prompt .* tokens but CLIP reads 75")
def test_batch_equals_single_prompts(openai_bpe):
    assert tokenize(PROMPTS).tolist() == [openai_row(openai_bpe, p) for p in PROMPTS]


# OpenAI's cleaner also html-unescapes twice after ftfy; ftfy itself leaves entities alone when the
# text contains '<' (it looks like HTML) and never touches an entity without its ';'. SD hosts run HF's
# CLIPTokenizer, so these ids are HF's (measured with transformers 4.30.2's slow tokenizer; ours
# gives the same on 4.x and 5.x).
@pytest.mark.parametrize(
    ("prompt", "hf_ids", "openai_ids"),
    [
        ("<b>&amp;</b>", [283, 321, 29, 261, 6259, 26, 34308, 321, 285], [283, 321, 29, 5, 34308, 321, 285]),
        ("&amp x", [261, 6259, 343], [261, 343]),
    ],
)
def test_html_entities_follow_hf_not_openai(openai_bpe, prompt, hf_ids, openai_ids):
    assert openai_bpe.encode(prompt) == openai_ids
    row = tokenize([prompt])[0].tolist()
    assert row[: len(hf_ids) + 2] == [BOS_ID, *hf_ids, EOS_ID]
    assert row[len(hf_ids) + 2 :] == [EOS_ID] * (MAX_LENGTH - len(hf_ids) - 2)


def test_anchor_ids_and_vocab_size():
    hf = tok.load_tokenizer()
    assert (VOCAB_SIZE, BOS_ID, EOS_ID, MAX_LENGTH) == (49408, 49406, 49407, 77)
    assert len(hf) == VOCAB_SIZE
    ids = hf.convert_tokens_to_ids(["a</w>", "photo</w>", "<|startoftext|>", "<|endoftext|>", "!"])
    assert ids == [320, 1125, BOS_ID, EOS_ID, 0]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, EOS_ID)
    assert tok.load_tokenizer() is hf


def test_shipped_vocab_and_merges_equal_openai(openai_bpe):
    vocab = json.loads((tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == openai_bpe.encoder
    lines = (tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    ranked = sorted(openai_bpe.bpe_ranks, key=openai_bpe.bpe_ranks.get)
    assert [tuple(line.split(" ")) for line in lines[1:]] == ranked


def test_generator_reproduces_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_clip_tokenizer", ROOT / "tools" / "make_clip_tokenizer.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    merges = gen.read_merges(gen.default_bpe_path())
    gen.write_folder(tmp_path, gen.build_vocab(merges), merges)
    names = ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
    assert sorted(p.name for p in tokenizer_dir().iterdir()) == sorted(names)
    for name in names:
        assert (tmp_path / name).read_bytes() == (tokenizer_dir() / name).read_bytes(), name


def test_padding_and_shape():
    ids = tokenize(["a photo of a cat", "a dog"])
    assert ids.dtype == torch.long and ids.shape == (2, MAX_LENGTH)
    assert ids[0].tolist() == [BOS_ID, 320, 1125, 539, 320, 2368] + [EOS_ID] * 71
    assert ids[1].tolist() == [BOS_ID, 320, 1929] + [EOS_ID] * 74
    assert tokenize([]).shape == (0, MAX_LENGTH)


def test_empty_prompt_is_sd_unconditional():
    assert tokenize([""])[0].tolist() == [BOS_ID] + [EOS_ID] * 76


def test_a_single_string_is_rejected():
    with pytest.raises(TypeError, match="sequence of prompts"):
        tokenize("a cat")


def test_exactly_75_tokens_fit_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(["a " * 75])
    assert ids[0].tolist() == [BOS_ID] + [320] * 75 + [EOS_ID]


def test_truncation_warns_once_per_prompt_with_exact_ids():
    long_a = "a photo of " + "a very " * 40 + "large cat"  # 85 tokens
    long_b = "a " * 76  # 76 tokens
    with pytest.warns(UserWarning) as record:
        ids = tokenize([long_a, "a cat", long_b])
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert messages[0] == (
        "prompt 'a photo of a very a very a very a very …' has 85 tokens but CLIP reads 75: dropped the last 10"
    )
    assert messages[1].endswith("has 76 tokens but CLIP reads 75: dropped the last 1")
    assert ids[0].tolist() == [BOS_ID, 320, 1125, 539] + [320, 1070] * 36 + [EOS_ID]
    assert ids[1].tolist() == [BOS_ID, 320, 2368] + [EOS_ID] * 74
    assert ids[2].tolist() == [BOS_ID] + [320] * 75 + [EOS_ID]


def test_folder_loads_offline_with_from_pretrained(tmp_path):
    # A fresh process with an empty HF cache and the hub switched off: only the shipped files count.
    code = (
        "import json, sys; from transformers import CLIPTokenizer; "
        "t = CLIPTokenizer.from_pretrained(sys.argv[1]); "
        "print(json.dumps([len(t), t.model_max_length, t.pad_token_id, t('a photo')['input_ids']]))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tokenizer_dir())], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [49408, 77, 49407, [49406, 320, 1125, 49407]]
