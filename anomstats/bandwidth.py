"""Bandwidth rules shared by the KDE and the torch adapter (placeholder)."""
