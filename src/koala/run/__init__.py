"""What every engine shares: the experiment set up from its config, the round loop, the progress
lines, the run directory and its checkpoints."""
