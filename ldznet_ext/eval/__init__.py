"""Evaluation: CLIPSeg and PhraseCut metrics (``metrics``), the evaluation loop (``evaluate``), ``ldznet eval``."""
