"""Recipes: the wiring of a dataset, a model and the one training loop (`tianying.train.loop.train`)."""
