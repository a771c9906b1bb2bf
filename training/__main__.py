"""``python -m flamingo_train --config X.yaml [overrides]`` (also what ``accelerate launch -m flamingo_train`` runs)."""

from flamingo_train.cli import main

main()
