"""Where training and evaluation samples come from; used by ``ldznet train``, ``ldznet eval`` and
``ldznet data summary``, and independent of both training and evaluation.

A source is a finite sequence of ``Example``s: one image with its referring phrases and their
masks (an absent phrase has an empty mask); trainers and evaluators turn examples into
``Sample``s, one (image, phrase, mask) each (``examples``). ``spec.open_source`` opens a source
from a spec string such as ``world:train:5000`` or ``phrasecut:DIR:train``; ``stream.iterate_examples``
reads examples in worker processes and skips unreadable ones. One module per format: ``world``
(micro-world scenes), ``manifest`` (JSON lines), ``phrasecut`` (PhraseCut), ``refcoco`` (RefCOCO,
RefCOCO+, G-Ref), ``folder`` (AIGI-style folders); ``geometry`` turns polygons and RLE into
masks, ``files`` reads files with path errors.
"""
