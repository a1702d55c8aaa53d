"""A real Slurm cluster (slurmctld + two slurmd + munge) on one machine, for tests."""
