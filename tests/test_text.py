"""CLIP text encoder: configs, encoding, and loading SD checkpoints' text weights in either key layout."""

from __future__ import annotations

import pytest
import torch

from fixtures_models import image_file  # noqa: F401  (pytest fixture)
from ldznet_ext.errors import CheckpointError, LdznetError
from ldznet_ext.sd.text import TextEncoder, normalize_text_state_dict, text_config
from ldznet_ext.sd.tokenizer import BOS_ID, EOS_ID, tokenize

PROMPTS = ["a photo of a cat", "", "the red car on the left, parked", "🐱 猫"]


def make_tiny(seed: int) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder.from_config(text_config("tiny")).eval()


@pytest.fixture(scope="module")
def tiny() -> TextEncoder:
    return make_tiny(0)


def assert_loads_as(state: dict, encoder: TextEncoder) -> None:
    """A differently seeded encoder that strictly loads ``state`` encodes PROMPTS exactly like ``encoder``."""
    fresh = make_tiny(1)
    fresh.load_text_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh.encode(PROMPTS), encoder.encode(PROMPTS))


def sd_style_state(encoder: TextEncoder, *, modern: bool, position_ids: torch.Tensor | None) -> dict:
    """The encoder's weights keyed as an SD file stores them below ``cond_stage_model.transformer.``."""
    state = {}
    for key, value in encoder.transformer.state_dict().items():
        root = key.removeprefix("text_model.")
        if root != "embeddings.position_ids":
            state[("text_model." if modern else "") + root] = value.clone()
    if position_ids is not None:
        state[("text_model." if modern else "") + "embeddings.position_ids"] = position_ids
    return state


def test_sd_v1_config_builds_vit_l14_text_tower():
    cfg = text_config("sd-v1")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49408, 768, 3072)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.max_position_embeddings) == (12, 12, 77)
    assert (cfg.hidden_act, cfg.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (49406, 49407, 1)
    with torch.device("meta"):
        encoder = TextEncoder.from_config(cfg)
    assert sum(p.numel() for p in encoder.parameters()) == 123_060_480
    assert encoder.context_dim == 768


def test_tiny_config_and_unknown_size():
    cfg = text_config("tiny")
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49408, 77)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (64, 2, 2, 128)
    with pytest.raises(ValueError, match=r"unknown text encoder size 'sd-v2'; expected one of \['sd-v1', 'tiny'\]"):
        text_config("sd-v2")


def test_encode_shape_and_determinism(tiny):
    with torch.no_grad():
        first = tiny.encode(PROMPTS)
        again = tiny.encode(PROMPTS)
        rebuilt = make_tiny(0).encode(PROMPTS)
    assert first.shape == (4, 77, 64) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, again) and torch.equal(first, rebuilt)
    assert not torch.equal(first[0], first[2])


def test_encode_is_forward_of_tokenized_prompts(tiny):
    with torch.no_grad():
        assert torch.equal(tiny.encode(PROMPTS), tiny(tokenize(PROMPTS)))


def test_output_is_after_final_layer_norm(tiny):
    # Default LayerNorm affine (weight 1, bias 0) at init: each token is zero-mean, unit-variance.
    with torch.no_grad():
        out = tiny.encode(["a photo of a cat"])
    assert torch.allclose(out.mean(-1), torch.zeros(1, 77), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(1, 77), atol=1e-3)


def test_empty_prompt_is_bos_then_eos(tiny):
    ids = torch.tensor([[BOS_ID] + [EOS_ID] * 76])
    with torch.no_grad():
        out = tiny.encode([""])
        assert torch.equal(out, tiny(ids))
    assert out.shape == (1, 77, 64) and torch.isfinite(out).all()


def test_batch_equals_per_prompt(tiny):
    with torch.no_grad():
        batch = tiny.encode(PROMPTS)
        for i, prompt in enumerate(PROMPTS):
            assert (batch[i] - tiny.encode([prompt])[0]).abs().max().item() <= 1e-6


def test_encode_follows_module_dtype():
    encoder = make_tiny(0).to(torch.bfloat16)
    with torch.no_grad():
        assert encoder.encode(["a cat"]).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("modern", "position_ids"),
    [
        (True, torch.arange(77).unsqueeze(0)),
        (False, torch.arange(77).unsqueeze(0)),
        (True, None),
        (False, None),
        # Some merged SD files carry float, off-by-rounding position ids; they must not leak in.
        (True, (torch.arange(77).float() - 0.3).unsqueeze(0)),
    ],
    ids=["modern", "old", "modern-no-position-ids", "old-no-position-ids", "damaged-position-ids"],
)
def test_both_layouts_load_strictly_and_match(tiny, modern, position_ids):
    state = sd_style_state(tiny, modern=modern, position_ids=position_ids)
    normalized = normalize_text_state_dict(state)
    expected = {"text_model." + k.removeprefix("text_model.") for k in tiny.transformer.state_dict()}
    assert set(normalized) == expected - {"text_model.embeddings.position_ids"}
    assert all(normalized[k] is v for k, v in state.items() if k in normalized)
    assert_loads_as(state, tiny)


def test_text_state_dict_is_sd_layout_and_round_trips(tiny):
    state = tiny.text_state_dict()
    reference = sd_style_state(tiny, modern=True, position_ids=None)
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    assert len(state) == 2 * 16 + 4  # per layer 16 tensors; token/position embeddings; final norm
    assert_loads_as(state, tiny)


def test_missing_weight_fails_strict_load(tiny):
    state = tiny.text_state_dict()
    del state["text_model.final_layer_norm.bias"]
    with pytest.raises(RuntimeError, match="final_layer_norm.bias"):
        make_tiny(1).load_text_state_dict(state)


def test_unexpected_and_duplicate_keys_are_rejected(tiny):
    modern = sd_style_state(tiny, modern=True, position_ids=None)
    with pytest.raises(CheckpointError, match="unexpected text-encoder key 'logit_scale'"):
        normalize_text_state_dict({**modern, "logit_scale": torch.zeros(())})
    old = sd_style_state(tiny, modern=False, position_ids=None)
    with pytest.raises(CheckpointError, match="appears both with and without 'text_model.'"):
        normalize_text_state_dict({**modern, **old})


def test_a_transformers_that_hides_its_torch_models_is_named(monkeypatch, ldznet, tiny_model_files, image_file):
    """transformers 5 on torch < 2.6 turns its torch models off; masks say what to install, in one line."""
    import transformers
    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)
    message = (f"transformers {transformers.__version__} does not run on torch {torch.__version__} (it turns its "
               "torch models off; transformers 5 needs torch >= 2.6): install 'transformers>=4.30,<5' or a newer torch")
    with pytest.raises(LdznetError) as caught:
        TextEncoder.from_config(text_config("tiny"))
    assert str(caught.value) == message
    code, out, err = ldznet("mask", image_file, "cat", "--model", tiny_model_files[0], "--zero-shot",
                            "-o", image_file.parent / "m.png")
    assert (code, out, err.strip().splitlines()) == (2, "", [f"ldznet mask: error: sd.safetensors: {message}"])
    assert not (image_file.parent / "m.png").exists()
