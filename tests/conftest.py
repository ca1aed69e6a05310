"""Shared test configuration."""

from server_fixtures import client, server  # noqa: F401 - fixtures for the end-to-end tests
