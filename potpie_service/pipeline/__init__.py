"""What the workers do with a job: run its steps against Potpie (steps.py), revive the ones a crash lost
(sweeper.py), tell waiting jobs their place in line (positions.py), abort a cancelled job's call (cancels.py),
deliver its final event to its callback_url (callbacks.py)."""
