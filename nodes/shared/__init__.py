"""Helpers shared by several techniques (no nodes)."""
