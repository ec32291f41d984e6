"""Training: hyperparameters, init strategies, evaluation and the single-run trainer."""
