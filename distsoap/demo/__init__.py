"""The demo: a small byte-level GPT trained with SOAP and with AdamW on a bundled corpus.

Run ``python -m distsoap.demo --help``.
"""
