"""A closed-world model's vocabulary: a term none of whose words the model was trained on is not found."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ldznet_ext.checkpoint_io import read_metadata
from ldznet_ext.defaults import default_model_paths
from ldznet_ext.errors import CheckpointError
from ldznet_ext.masks.presence import UNKNOWN_WORDS, TermPresence, knows_term
from ldznet_ext.sd.checkpoint import load_stable_diffusion, parse_sd_metadata, save_stable_diffusion
from ldznet_ext.world.spec import VOCABULARY
from ldznet_ext.world.train_sd import WORLD_VOCABULARY
from oracle import OracleSegmenter

WORDS = frozenset({"red", "star", "stars", "sky"})


def test_a_term_is_known_when_one_of_its_words_is() -> None:
    assert knows_term("red star", WORDS) and knows_term("purple star", WORDS)
    assert knows_term("RED-Goblin", WORDS)  # letters only, without case
    assert knows_term("  sky  ", WORDS)
    assert not knows_term("goblin", WORDS)
    assert not knows_term("a redstar", WORDS)  # words, not substrings
    assert not knows_term("42 ___ !", WORDS)
    assert knows_term("star2", WORDS) and knows_term("red_stars", WORDS)  # digits and "_" separate words


def test_the_world_records_its_phrase_words() -> None:
    words = set(VOCABULARY.phrase_words())
    assert WORLD_VOCABULARY == words
    assert words == {*VOCABULARY.colours, *VOCABULARY.shapes, *VOCABULARY.plurals, *VOCABULARY.stuff}
    assert {"a", "of", "cartoon", "photo"}.isdisjoint(words)  # caption filler names nothing
    assert all(knows_term(phrase, words) for phrase in VOCABULARY.phrases())


def test_the_embedded_model_lists_the_world_s_words(ldznet) -> None:
    assert read_metadata(default_model_paths()[0])["vocabulary"] == sorted(WORLD_VOCABULARY)
    code, out, _ = ldznet("info", default_model_paths()[0], "--json")
    report = json.loads(out)
    assert code == 0 and report["vocabulary"] == sorted(WORLD_VOCABULARY) and report["resolution"] == 128
    assert report["dtype"] == "float16" and report["parameters"] == 7_010_739


class _ClosedWorldOracle(OracleSegmenter):
    vocabulary = WORDS


def test_an_unknown_term_is_not_found_whatever_its_map_says() -> None:
    maps = {"goblin": torch.full((10, 10), 0.99), "sky": torch.zeros(10, 10)}
    maps["sky"][:3] = 0.95
    prediction = _ClosedWorldOracle(maps).predict("goblin OR sky")
    assert prediction.presence["goblin"] == UNKNOWN_WORDS
    assert prediction.presence["sky"] == TermPresence(True, pytest.approx(0.95))
    assert int(prediction.mask.sum()) == 30  # the sky alone
    assert prediction.missing_notes() == ["no match for 'goblin' (none of its words is one the model was trained on)"]
    assert prediction.presence_report()["goblin"] == {"found": False, "score": 0.0,
                                                      "why": "none of its words is one the model was trained on"}
    assert prediction.presence_report()["sky"] == {"found": True, "score": 0.95}
    # an open-vocabulary model (no list) decides by the map alone
    assert OracleSegmenter(maps).predict("goblin").presence["goblin"].found


def test_the_vocabulary_survives_a_save_and_load(tmp_path, tiny_sd) -> None:
    model = copy.deepcopy(tiny_sd)
    model.vocabulary = WORDS
    save_stable_diffusion(model, tmp_path / "closed.safetensors")
    assert load_stable_diffusion(tmp_path / "closed.safetensors").vocabulary == WORDS
    save_stable_diffusion(tiny_sd, tmp_path / "open.safetensors")
    assert "vocabulary" not in read_metadata(tmp_path / "open.safetensors")
    assert load_stable_diffusion(tmp_path / "open.safetensors").vocabulary is None


@pytest.mark.parametrize("words", [[], "star", ["Star"], ["two words"], ["star", 3], ["x" * 65], ["star"] * 10_001])
def test_a_bad_vocabulary_field_is_refused_by_name(words) -> None:
    with pytest.raises(CheckpointError) as error:
        parse_sd_metadata({"vocabulary": words}, "m.safetensors")
    assert str(error.value) == (f"m.safetensors: field 'ldznet.vocabulary' is {json.dumps(words)[:80]}; expected a "
                                "JSON list of 1 to 10000 lower-case words")



def test_one_notion_of_a_word_for_vocabularies_and_terms():
    """ldznet_ext.words: letters of any script; digits and '_' separate words; a vocabulary word is one
    casefolded word of at most 64 letters."""
    from ldznet_ext.words import is_vocabulary_word, words

    assert words("Red star2 blue_sky, Étoile") == ["red", "star", "blue", "sky", "étoile"]
    assert [is_vocabulary_word(w) for w in ("star", "étoile", "a" * 64, "a" * 65, "Star", "star2", "red star", "",
                                            5, None)] == [True, True, True, False, False, False, False, False,
                                                          False, False]
