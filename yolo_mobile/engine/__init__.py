"""Training, evaluation and prediction loops, and the pieces they share (post-processing, checkpoints)."""
