"""The user-facing engine: set an image once, then ask for as many mask expressions as you like.

>>> segmenter = Segmenter(backbone, head, head_config)
>>> segmenter.set_image("photo.png")               # z is encoded once and cached
>>> result = segmenter.predict("goblin OR sword")   # all terms in one batch
>>> result.mask                                      # [H, W] at the image's own size

Data flows one way: image -> z (cached) -> SD features (tap) + head -> per-term probability ->
upsampling to the image, guided by its full-resolution pixels (``refine.py``; bilinear when
refinement is off) -> expression algebra -> final mask. Without a head, per-term maps come from
the zero-shot probe instead.
"""

from __future__ import annotations

import string
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .backbones.base import Backbone, Conditioning
from .errors import LdznetError
from .images import (MAX_PIXELS, Box, ImageInput, crop_to_box, image_box, load_image, resize_probability,
                     to_model_input, type_name, working_size)
from .limits import BATCH_SIZE, DRAWS, RESOLUTION, SEED, TIMESTEP, shown
from .graphs import GraphCache, graph_cache
from .masks.expression import MAX_TERMS, Or, Term, parse, reparsed
from .masks.instances import Instance, find_instances
from .masks.ops import MaskOptions, feather, select_mask
from .masks.presence import HEAD_RULE, UNKNOWN_WORDS, ZERO_SHOT_RULE, PresenceRule, TermPresence, knows_term
from .masks.tree import Expression
from .modeling.build import HeadConfig
from .refine import RefineSettings, refine_probability
from .sd.schedule import noise_draws
from .tap import tapped_features
from .zeroshot import ZERO_SHOT_RESOLUTION, ZeroShotSettings, zero_shot_maps


@dataclass(frozen=True)
class SegmenterSettings:
    """resolution: side of the working area (sides become multiples of 64; None = the head's training
    resolution, 384 for the official head); timestep: SD timestep of the feature step (None: drawn
    from 300..499 per draw, as the official code); draws: feature steps averaged; seed: noise seed;
    sample_latent: encode with a seeded posterior sample instead of the mean; prompt_template: how a
    term becomes a prompt ("{}" = as typed); refine: how each term's map is upsampled to the image
    (image-guided by default; ``RefineSettings(enabled=False)``: bilinear); cuda_graphs: on CUDA,
    replay the model calls as captured graphs where safe (``graphs.py``; same masks, less launch
    overhead; False: always eager). The numbers' ranges are
    ``limits.RESOLUTION``, ``TIMESTEP``, ``DRAWS`` and ``SEED``; others raise LdznetError."""

    resolution: int | None = None
    timestep: int | None = 400
    draws: int = 1
    seed: int = 0
    sample_latent: bool = False
    prompt_template: str = "{}"
    zero_shot: ZeroShotSettings = field(default_factory=ZeroShotSettings)
    refine: RefineSettings = field(default_factory=RefineSettings)
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.resolution is not None:
            RESOLUTION.check(self.resolution, "resolution")
        if self.timestep is not None:
            TIMESTEP.check(self.timestep, "timestep")
        DRAWS.check(self.draws, "draws")
        SEED.check(self.seed, "seed")
        for name in ("sample_latent", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise LdznetError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name, kind in (("zero_shot", ZeroShotSettings), ("refine", RefineSettings)):
            if not isinstance(getattr(self, name), kind):
                raise LdznetError(f"{name} must be {kind.__name__}, got {type_name(getattr(self, name))}")
        if not _fills_one_term(self.prompt_template):
            raise LdznetError(f"prompt_template must be text with one '{{}}' where the term goes, got "
                              f"{self.prompt_template!r}")


def _fills_one_term(template: object) -> bool:
    """Whether ``template`` is text with one "{}" and nothing else for ``str.format`` to fill (escaped
    braces, ``{{}}``, are text: counting "{}" in it took "{{}}" for the term's place)."""
    if not isinstance(template, str):
        return False
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # an unmatched brace
        return False
    return fields == [("", "", None)]


@dataclass(eq=False)  # identity: a generated == would ask the tensors for their truth
class Prediction:
    """One answer: ``probability`` (the expression's combined map) and ``mask`` (after threshold,
    region filters, invert and feather), both float [H, W] in [0, 1] at the image's size;
    ``terms`` holds each term's own map [H, W] as the expression combined it: upsampled to the
    image's size, image-guided when ``SegmenterSettings.refine`` is on, zero for a term not found (one
    zero viewed at every pixel: writing one pixel writes all, so clone it first);
    ``presence`` each term's found / not-found decision and score (empty when presence is off);
    ``selected`` the mask before feathering, bool [H, W]; ``inverted`` whether the mask is the
    expression's inverse (``MaskOptions.invert``)."""

    expression: Expression
    probability: Tensor
    mask: Tensor
    terms: dict[str, Tensor]
    presence: dict[str, TermPresence] = field(default_factory=dict)
    selected: Tensor | None = None
    inverted: bool = False

    @property
    def missing(self) -> list[str]:
        """The terms that were decided not to be in the image."""
        return [term for term, decision in self.presence.items() if not decision.found]

    def missing_notes(self) -> list[str]:
        """One line per term judged not to be in the image: "no match for 'goblin' (score 0.12)"."""
        return [f"no match for {term!r} ({self.presence[term].why or f'score {self.presence[term].score:.2f}'})"
                for term in self.missing]

    def presence_report(self) -> dict[str, dict]:
        """{term: {"found", "score"[, "why"]}}, JSON-ready (empty when presence is off)."""
        return {term: decision.to_dict() for term, decision in self.presence.items()}

    def instances(self) -> list[Instance]:
        """The final mask's instances, left to right (``masks.instances``), scored on how surely their
        pixels are selected: ``probability``, or 1 - ``probability`` when ``inverted``."""
        selected = self.mask > 0.5 if self.selected is None else self.selected
        return find_instances(selected, 1 - self.probability if self.inverted else self.probability)

    def mask_image(self) -> np.ndarray:
        """The mask as uint8 [H, W] (0/255 unless feathered), white = selected (repaint)."""
        return (self.mask.float().cpu().numpy() * 255.0 + 0.5).astype(np.uint8)

    def probability_image(self) -> np.ndarray:
        """The probability as uint16 [H, W] in 0..65535."""
        return (self.probability.float().cpu().numpy() * 65535.0 + 0.5).astype(np.uint16)


@dataclass
class _ImageState:
    image: np.ndarray  # uint8 [H, W, 3], the original: it guides the upsampling of every term map
    z: Tensor  # [1, C, h, w]
    pixels: Tensor | None  # [1, 3, 8h, 8w] in [-1, 1], kept for RGBNet
    frame: tuple[int, int]  # (8w, 8h), the working size
    box: Box  # where the image lies in the frame (all of it, unless letterboxed)
    # term -> probability as the model gives it ([8h, 8w] from a head, [h, w] zero-shot) over the box;
    # resized to the image's size only once, on the way out (a second resize would blur it twice)
    cache: dict[str, Tensor] = field(default_factory=dict)
    # term -> presence score of a head with a presence output, from the same head call as its map
    scores: dict[str, float] = field(default_factory=dict)
    # held while the cache is read or changed: threads sharing the Segmenter share its image's cache
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def remember(self, used: Sequence[str]) -> None:
        """Mark the cached terms ``used`` most recent, then drop the least recently used beyond
        MAX_CACHED_TERMS."""
        for term in used:
            if term in self.cache:
                self.cache[term] = self.cache.pop(term)
        while len(self.cache) > MAX_CACHED_TERMS:
            oldest = next(iter(self.cache))
            del self.cache[oldest]
            self.scores.pop(oldest, None)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def crop(self, maps: Tensor) -> Tensor:
        """The part of maps over the frame (on its grid or the latent's) that covers the image."""
        return crop_to_box(maps, self.box, self.frame)


MAX_CACHED_TERMS = 4 * MAX_TERMS
"""Term maps one image keeps for later expressions (least recently used dropped): a long-lived image
that sees term after term (a WebUI session, a script's loop) would otherwise keep every map."""


class _KnownTerms(NamedTuple):
    """What one call knows of its terms on one image: term -> map as the model gave it, term -> presence score."""

    maps: dict[str, Tensor]
    scores: dict[str, float]


class Segmenter:
    """Text-prompted masks on one backbone, with an LD-ZNet / ZNet / RGBNet head or zero-shot.

    Threads: the models may be shared. Give each thread its own Segmenter (``with_settings()`` makes
    one on the same models, no copy) or call ``predict_images`` on a shared one; each thread then
    gets exactly its single-thread result. The feature tap serialises the hooked UNet calls (a lock
    per UNet, which the WebUI host's own calls of it do not take) and its hooks ignore other threads'
    calls. The current image (``set_image``) is one per Segmenter: threads that set different images
    on one Segmenter see each other's (each call reads it once: a mask is all of one image, or the
    call raises that no image is set, while another thread's ``set_image`` runs).
    """

    def __init__(self, backbone: Backbone, head: nn.Module | None = None, head_config: HeadConfig | None = None,
                 settings: SegmenterSettings = SegmenterSettings(), name: str = "the SD model",
                 graphs: GraphCache | None = None):
        """``name``: what errors call the models (``load_segmenter`` gives the file names); ``graphs``:
        where captured calls are kept (None: the UNet's shared cache, ``graphs.graph_cache``)."""
        if (head is None) != (head_config is None):
            raise LdznetError("pass both head and head_config, or neither for zero-shot masks")
        if not isinstance(settings, SegmenterSettings):
            raise LdznetError(f"settings must be SegmenterSettings, got {type_name(settings)}")
        self.backbone = backbone
        self.head = head
        self.head_config = head_config
        self.settings = settings
        self.name = name
        self._graphs = graphs
        self._image: _ImageState | None = None

    @property
    def graphs(self) -> GraphCache:
        """Where this segmenter's captured CUDA graphs are kept (the UNet's shared cache unless given)."""
        if self._graphs is None:
            self._graphs = graph_cache(self.backbone.unet)
        return self._graphs

    @property
    def zero_shot(self) -> bool:
        """Whether masks come from the SD model's own attention (no head)."""
        return self.head is None

    @property
    def resolution(self) -> int:
        """Side of the working area: the setting, else the head's training resolution, else the model's."""
        if self.settings.resolution:
            return self.settings.resolution
        if self.head_config is not None:
            return self.head_config.latent_size * self.backbone.downsample_factor
        return getattr(self.backbone, "resolution", None) or ZERO_SHOT_RESOLUTION

    # -- image -----------------------------------------------------------------------------

    def set_image(self, image: ImageInput, max_pixels: int = MAX_PIXELS) -> None:
        """Load an image (path, bytes, PIL, array; at most ``max_pixels``) and encode it once; later
        predictions reuse it. When it fails no image is set, so no later mask is one of the
        previous image."""
        self._image = None
        self._image = self._encode([load_image(image, max_pixels)])[0]

    def reset_image(self) -> None:
        """Forget the current image (its latents and cached maps)."""
        self._image = None

    @property
    def is_image_set(self) -> bool:
        """Whether an image is set (``predict`` needs one)."""
        return self._image is not None

    @torch.no_grad()
    def _encode(self, images: Sequence[np.ndarray]) -> list[_ImageState]:
        height, width = images[0].shape[:2]
        for number, im in enumerate(images[1:], 2):
            if im.shape[:2] != (height, width):
                raise LdznetError(f"predict_images needs images of one size: image {number} is {im.shape[1]}x"
                                  f"{im.shape[0]} (width x height), image 1 is {width}x{height}")
        size = working_size(width, height, self.resolution)
        box = image_box(width, height, size, self.backbone.downsample_factor)
        pixels = torch.cat([to_model_input(im, size, box) for im in images]).to(self.backbone.device)
        if self.settings.sample_latent:
            generator = torch.Generator(pixels.device).manual_seed(self.settings.seed)
            z = self.backbone.encode_image(pixels, sample=True, generator=generator)
        else:
            z, = self.run_graphed("encode", lambda p: (self.backbone.encode_image(p),), (pixels,), encodes_image=True)
        self._check_finite(z, "latents")
        keep_pixels = self.head_config is not None and self.head_config.input_kind == "image"
        return [_ImageState(im, z[i:i + 1], pixels[i:i + 1] if keep_pixels else None, size, box)
                for i, im in enumerate(images)]

    # -- prediction ------------------------------------------------------------------------

    def _current(self) -> _ImageState:
        """The current image's state, read once per call (another thread's ``set_image`` may replace it)."""
        state = self._image
        if state is None:
            raise LdznetError("An image must be set with .set_image(...) before mask prediction.")
        return state

    def predict(self, expression: str | Expression, options: MaskOptions = MaskOptions()) -> Prediction:
        """Evaluate a mask expression on the current image."""
        return self._predict([self._current()], self._checked_tree(expression, options), options)[0]

    def predict_images(self, images: Sequence[ImageInput], expression: str | Expression,
                       options: MaskOptions = MaskOptions(), max_pixels: int = MAX_PIXELS) -> list[Prediction]:
        """Evaluate one expression on a list of same-size images in one batch (the current image is kept);
        at most ``BATCH_SIZE.high`` images, which with every term go through the model at once."""
        if not isinstance(images, (list, tuple)):  # a str or an array would be iterated as many "images"
            raise LdznetError(f"predict_images expects a list of images, got {type_name(images)}; "
                              "for one image use set_image and predict")
        if len(images) > BATCH_SIZE.high:  # a gallery in one call would end out of memory, not in masks
            raise LdznetError(f"predict_images takes at most {BATCH_SIZE.high} images at once, got {len(images)}; "
                              "call it once per part of the list")
        tree = self._checked_tree(expression, options)  # also when there is no image to predict on
        loaded = [load_image(im, max_pixels) for im in images]
        return self._predict(self._encode(loaded), tree, options) if loaded else []

    def predict_terms(self, terms: str | Sequence[str]) -> dict[str, Tensor]:
        """Each term's probability map [H, W] in [0, 1] at the current image's size (refined as set);
        a str is one term."""
        state = self._current()
        if not isinstance(terms, (str, list, tuple)):
            raise LdznetError(f"terms must be a string or a list of strings, got {type_name(terms)}")
        listed = [terms] if isinstance(terms, str) else list(terms)
        if not listed or not all(isinstance(term, str) for term in listed):
            raise LdznetError(f"terms must be one or more strings, got {shown(listed)}")
        unique = list(dict.fromkeys(listed))
        # The rules of a term in an expression (text, at most MAX_TERMS, no control characters)
        reparsed(Term(unique[0]) if len(unique) == 1 else Or(tuple(Term(term) for term in unique)))
        (known,) = self._fill_cache([state], unique)
        return self._upsample(state, known.maps)

    def _upsample(self, state: _ImageState, maps: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The terms' maps as the model gave them (``_fill_cache``) at the image's size: image-guided, or
        bilinear when refinement is off."""
        refine = self.settings.refine
        if not refine.active or not maps:
            return {t: resize_probability(m, state.size) for t, m in maps.items()}
        # One model gives all maps of an image the same size, so they are refined as one stack.
        refined = refine_probability(torch.stack(list(maps.values())), state.image, refine,
                                     decided_at=tuple(state.crop(state.z).shape[-2:]))
        return dict(zip(maps, refined))

    @property
    def presence_rule(self) -> PresenceRule:
        """How a term's map decides whether it is in the image (calibrated per mode, masks/presence.py);
        a head with a learned presence output decides with that instead (``decide_presence``)."""
        return ZERO_SHOT_RULE if self.zero_shot else HEAD_RULE

    @property
    def learned_presence(self) -> bool:
        """Whether the head has a presence output (its score, not the map rule, decides presence)."""
        return self.head_config is not None and self.head_config.presence

    def decide_presence(self, maps: dict[str, Tensor]) -> dict[str, TermPresence]:
        """Each term's found / not-found decision on the current image, for its map as
        ``predict_terms`` gave it (float [H, W] at the image's size, finite)."""
        state = self._current()
        if not isinstance(maps, Mapping):
            raise LdznetError(f"maps must be a mapping of term -> map, as predict_terms gives, got {type_name(maps)}")
        for term, probability in maps.items():
            if not isinstance(probability, Tensor) or not probability.is_floating_point() or \
                    tuple(probability.shape) != state.size or not bool(torch.isfinite(probability).all()):
                found = (f"{probability.dtype} tensor of shape {tuple(probability.shape)}"
                         if isinstance(probability, Tensor) else type_name(probability))
                raise LdznetError(f"the map of {term!r} must be a finite float tensor of the image's size "
                                  f"{state.size}, got {found}")
        with state.lock:
            scores = dict(state.scores)
        for term in maps:
            if self.learned_presence and term not in scores:  # the head's score comes with its map
                raise LdznetError(f"no presence score for {term!r} on this image; call predict_terms with it first")
        return self._decide(maps, scores)

    @property
    def vocabulary(self) -> frozenset[str] | None:
        """The words the model was trained to name, when its file lists them; None: any word."""
        return getattr(self.backbone, "vocabulary", None)

    def _decide(self, maps: Mapping[str, Tensor], scores: Mapping[str, float]) -> dict[str, TermPresence]:
        """Each term's decision from its map, or from its presence score (``scores``) where the head has one."""
        vocabulary = self.vocabulary
        decisions = {}
        for term, probability in maps.items():
            if vocabulary is not None and not knows_term(term, vocabulary):
                decisions[term] = UNKNOWN_WORDS
            elif self.learned_presence:
                score = scores[term]
                decisions[term] = TermPresence(score > self.head_config.presence_level, score)
            else:
                decisions[term] = self.presence_rule.decide(probability)
        return decisions

    @staticmethod
    def _checked_tree(expression: str | Expression, options: MaskOptions) -> Expression:
        """The expression parsed (text) or checked (a tree), after checking ``options``."""
        if not isinstance(expression, (str, Expression)):
            raise LdznetError(f"expected a mask expression as text, such as 'cat OR dog', got {type_name(expression)}")
        if not isinstance(options, MaskOptions):
            hint = "; a MaskJob gives job.tree() and job.mask_options()" if hasattr(options, "mask_options") else ""
            raise LdznetError(f"options must be MaskOptions, got {type_name(options)}{hint}")
        return parse(expression) if isinstance(expression, str) else reparsed(expression)

    def _predict(self, states: list[_ImageState], tree: Expression, options: MaskOptions) -> list[Prediction]:
        terms = tree.terms()
        predictions = []
        for state, known in zip(states, self._fill_cache(states, terms)):
            maps = self._upsample(state, known.maps)
            presence = self._decide(maps, known.scores) if options.presence else {}
            # An absent term adds nothing: "goblin OR sky" is the sky, "sky AND NOT goblin" all of it. Its
            # zeros are one value expanded, not a copy of an image-size map per absent term.
            maps = {t: m.new_zeros(()).expand_as(m) if t in presence and not presence[t].found else m
                    for t, m in maps.items()}
            probability = tree.evaluate(maps, options.threshold)
            selected = select_mask(probability, options)
            mask = feather(selected.to(probability.dtype), options.feather)
            predictions.append(Prediction(tree, probability, mask, maps, presence, selected, options.invert))
        return predictions

    @torch.no_grad()
    def _fill_cache(self, states: list[_ImageState], terms: Sequence[str]) -> list[_KnownTerms]:
        """Each state's maps (and presence scores) of ``terms``: the cached ones, and the others computed and
        cached. What a call read or computed is what it answers with, though another thread's call on the same
        image may evict those terms from the cache meanwhile (the model runs outside the lock)."""
        known = []
        for state in states:
            with state.lock:
                known.append(_KnownTerms({t: state.cache[t] for t in terms if t in state.cache},
                                         {t: state.scores[t] for t in terms if t in state.scores}))
        todo = [t for t in terms if any(t not in k.maps for k in known)]
        if todo:
            self._compute(states, todo, known)
        for state in states:
            with state.lock:
                state.remember(terms)
        return [_KnownTerms({t: k.maps[t] for t in terms}, k.scores) for k in known]  # in the order asked

    def _compute(self, states: list[_ImageState], todo: list[str], known: list[_KnownTerms]) -> None:
        """The maps (and scores) of the terms ``todo`` on every state, into its cache and ``known``."""
        z = torch.cat([s.z for s in states])
        conditioning = self.backbone.encode_text([self.settings.prompt_template.format(t) for t in todo])
        if self.zero_shot:
            probabilities = zero_shot_maps(self.backbone, z, todo, conditioning, self.settings.zero_shot,
                                           self.settings.seed, self.run_graphed)
        else:
            pixels = torch.cat([s.pixels for s in states]) if states[0].pixels is not None else None
            probabilities, scores = (self._head_outputs(z, pixels, conditioning) if self.learned_presence
                                     else (self._head_probabilities(z, pixels, conditioning), None))
        self._check_finite(probabilities, "probabilities")
        if self.learned_presence:  # a NaN score is below every level: the term would pass as absent
            self._check_finite(scores, "presence scores")
        for i, state in enumerate(states):
            with state.lock:
                for j, term in enumerate(todo):
                    known[i].maps[term] = state.cache[term] = state.crop(probabilities[i, j].float())
                    if self.learned_presence:
                        known[i].scores[term] = state.scores[term] = float(scores[i, j])

    def _check_finite(self, values: Tensor, what: str) -> None:
        """Refuse NaN/inf (NaN weights, or fp16 overflow): thresholded, they would pass as an empty mask."""
        if not bool(torch.isfinite(values).all()):
            raise LdznetError(f"{self.name}: the model produced NaN/inf {what}; its weights may be corrupt, "
                              "or it needs fp32 (dtype fp32)")

    def _head_probabilities(self, z: Tensor, pixels: Tensor | None, conditioning: Conditioning) -> Tensor:
        """[N, T, 8h, 8w] head probabilities for N latents and T terms' conditioning, in one batch."""
        return self._head_outputs(z, pixels, conditioning)[0]

    def _head_outputs(self, z: Tensor, pixels: Tensor | None,
                      conditioning: Conditioning) -> tuple[Tensor, Tensor | None]:
        """``_head_probabilities`` and the presence scores [N, T] from the same head calls (None
        without a presence output); both averaged over the draws."""
        n, t_count = z.shape[0], len(conditioning)
        z_rep = z.repeat_interleave(t_count, dim=0)
        conditioning_rep = conditioning.repeat(n)
        if not self.head_config.uses_sd_features:
            inputs = z_rep if pixels is None else pixels.repeat_interleave(t_count, dim=0)
            calls: Iterable[tuple[Tensor, ...]] = [self.run_graphed(
                "head", lambda x, context: self._head(x, context, None), (inputs, conditioning_rep.context))]
        else:  # one draw's SD features at a time
            draws = noise_draws(self.settings.seed, self.settings.draws, (1, *z.shape[1:]), self.settings.timestep)
            calls = (self._head_on_features(z_rep, conditioning_rep, t, noise) for t, noise in draws)
        total, scores, count = None, None, 0
        for logits, *presence in calls:
            p = torch.sigmoid(logits.float())
            total = p if total is None else total + p
            if presence:
                score = torch.sigmoid(presence[0].float())
                scores = score if scores is None else scores + score
            count += 1
        scores = None if scores is None else (scores / count).view(n, t_count)
        return (total / count).view(n, t_count, *total.shape[-2:]), scores

    def _head_on_features(self, z: Tensor, conditioning: Conditioning, timestep: int,
                          noise: Tensor) -> tuple[Tensor, ...]:
        """One draw: the head's outputs (``_head``) on the SD features of z noised to ``timestep``."""
        t = torch.full((z.shape[0],), timestep, dtype=torch.long)
        z_t = self.backbone.schedule.q_sample(z, t, noise)  # eager: the noise is new each draw, the shapes are not

        def features_and_head(z: Tensor, z_t: Tensor, t: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
            rows = conditioning.with_tensors(tensors)
            return self._head(z, rows.context, self.head_features(z_t, t, rows))

        return self.run_graphed("head", features_and_head, (z, z_t, t.to(z.device), *conditioning.tensors()))

    def head_features(self, z_t: Tensor, t: Tensor, conditioning: Conditioning) -> dict[int, Tensor]:
        """The SD features of the head's blocks for latents already noised to timesteps t (one
        denoiser call): where every head prediction gets them, so a tool may replace them."""
        return tapped_features(self.backbone, z_t, t, conditioning, self.head_config.sd_blocks)

    def _head(self, x: Tensor, context: Tensor, features: dict[int, Tensor] | None) -> tuple[Tensor, ...]:
        """The head on its inputs in its own dtype: (logits,), or (logits, presence logits) when it
        has a presence output."""
        dtype = self._head_dtype
        args = (x.to(dtype), context.to(dtype)) + (() if features is None else
                                                   ({b: f.to(dtype) for b, f in features.items()},))
        return tuple(self.head(*args, with_presence=True)) if self.learned_presence else (self.head(*args),)

    def run_graphed(self, purpose: str, call: Callable[..., tuple[Tensor, ...]], inputs: Sequence[Tensor],
                    constants: Hashable = (), encodes_image: bool = False) -> tuple[Tensor, ...]:
        """``call(*inputs)`` (tensors in, a tuple of tensors out), replayed from a captured CUDA graph
        where ``settings.cuda_graphs`` allows and ``graphs.GraphCache`` finds it safe, else eager.
        ``purpose`` names the call; what it bakes in beyond its inputs' shapes is fixed by the models
        and the settings (keyed here) or given as ``constants``. The call runs the backbone's image
        encoder if ``encodes_image``, else its denoiser and the head (if any)."""
        if not self.settings.cuda_graphs:
            return call(*inputs)
        parts = getattr(self.backbone, "capture_modules", None)
        modules = None if parts is None else (
            (parts.image_encoder,) if encodes_image else (parts.denoiser, *(() if self.head is None else (self.head,))))
        key = (constants, self.settings.zero_shot if self.zero_shot else None)
        return self.graphs.run(purpose, call, inputs, modules, key)

    @property
    def _head_dtype(self) -> torch.dtype:
        return next(self.head.parameters()).dtype

    def with_settings(self, **changes) -> Segmenter:
        """A segmenter on the same models with changed settings (no image set)."""
        unknown = sorted(set(changes) - {spec.name for spec in fields(SegmenterSettings)})
        if unknown:
            raise LdznetError(f"unknown settings {unknown}; expected some of "
                              f"{[spec.name for spec in fields(SegmenterSettings)]}")
        return Segmenter(self.backbone, self.head, self.head_config, replace(self.settings, **changes), self.name,
                         self._graphs)
