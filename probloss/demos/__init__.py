"""Runnable user stories (see DESIGN.md); ``probloss demo NAME`` runs one."""
