"""Recipes that build whole models from nothing: ``python -m flamingo_train.recipes.micro`` (the micro model)."""
