"""Readers of real data sets, one module per format, opened through ``train.data.open_source``:
``phrasecut`` (PhraseCut), ``refcoco`` (RefCOCO, RefCOCO+, G-Ref), ``folder`` (AIGI-style
folders); ``geometry`` turns polygons and RLE into masks, ``files`` reads files with path errors."""
