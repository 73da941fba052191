"""The closed loop: pipeline files and their steps (collect, train, gate, package, roll out, promote)."""
