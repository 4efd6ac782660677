"""Integrations with other training frameworks (``rankwise.integrations.hf``: ``transformers.Trainer``)."""
