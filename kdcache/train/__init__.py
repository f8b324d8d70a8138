"""Training-side code: distillation losses and the student training loop."""
