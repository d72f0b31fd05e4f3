"""A sweep's jobs (-m), the launchers' settings, and SLURM."""
