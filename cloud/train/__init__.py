"""Training: data sets, model definitions, the training loop and its distributed launcher, run records."""
