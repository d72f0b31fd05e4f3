"""The Optuna search as a Hydra sweep: the study, its trials in the jobs, the plots."""
