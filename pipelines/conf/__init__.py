"""Hydra configs shipped inside the distribution (found through ``importlib`` by the installed CLI)."""
