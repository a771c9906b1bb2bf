"""Training entry points (import name: flamingo_train)."""
