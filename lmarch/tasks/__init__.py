"""What people use models for: sampling text, evaluating runs, the demo."""
