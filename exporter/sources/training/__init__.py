"""Training the demo checkpoints: a generated world of facts (`world`) and the training run (`train`)."""
