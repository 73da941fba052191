"""The operator's side: the fleet, rollouts, and the ``edgeloop`` command line."""
