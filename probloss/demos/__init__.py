"""Runnable user stories; ``probloss demo NAME`` runs one (``probloss demo --help`` lists them)."""
