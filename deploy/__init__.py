"""Taskfleet deployment tooling: Ansible roles and the local lab (`python -m deploy.lab`)."""
