"""Integrations with training frameworks; each imports its framework only when used.

- :mod:`.deepspeed`: ``"type": "SOAP"`` in DeepSpeed JSON configs, ZeRO stages 0 to 3.
"""
