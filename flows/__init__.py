"""Flows put tasks in order; no math here."""
