"""Looking inside models and runs: accounting, plots."""
