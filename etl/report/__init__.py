"""Diff and run reports: text, json, markdown, html. Pure."""
