"""Client library, evaluation tasks, evaluation runner and load tester for sparse-serve."""
