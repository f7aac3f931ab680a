"""Write the CLIP ViT-L/14 tokenizer files into ldznet_ext/sd/assets/clip_tokenizer/.

Source: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (shipped by the ``clip`` package, clip-anytorch).
Output: vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, an offline
Hugging Face tokenizer folder whose ids equal openai/clip-vit-large-patch14's (49,408 tokens).

    python tools/make_clip_tokenizer.py [--bpe PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP keeps the first 49,152 - 256 - 2 merges of the 262k-line file: 256 byte tokens, their
# 256 "</w>" twins, the merges and 2 specials make exactly 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
MERGES_HEADER = "#version: 0.2"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "ldznet_ext" / "sd" / "assets" / "clip_tokenizer"


def byte_symbols() -> list[str]:
    """The 256 byte-level BPE symbols in CLIP's id order.

    Bytes that are visible Latin-1 characters stand for themselves (ids 0..187, ascending);
    the other 68 bytes (whitespace, controls) are shifted to code points 256, 257, ... so
    that no symbol is invisible.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in visible] + [chr(256 + i) for i in range(256 - len(visible))]


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The merge pairs CLIP uses, in rank order (line 0 of the file is a version header)."""
    try:
        lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:  # missing, not gzip, truncated, not text
        raise SystemExit(f"{bpe_path}: cannot read the BPE file ({type(error).__name__}: {error})") from None
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise SystemExit(f"{bpe_path}: expected {NUM_MERGES} merge pairs after the header")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id: byte symbols, byte symbols + "</w>", one token per merge, then BOS and EOS."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def default_bpe_path() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `clip` package (clip-anytorch) is not installed; pass --bpe PATH")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def write_folder(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write the four files; compact JSON with raw UTF-8 keeps vocab.json near its minimum size."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out}: a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    dump = {"ensure_ascii": False, "separators": (",", ":")}
    (out / "vocab.json").write_text(json.dumps(vocab, **dump) + "\n", encoding="utf-8")
    merge_lines = [MERGES_HEADER] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe", type=Path, default=None, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    merges = read_merges(args.bpe or default_bpe_path())
    vocab = build_vocab(merges)
    write_folder(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
