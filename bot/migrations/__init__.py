"""Alembic migrations of the run store (see bot/store.py); run by `Store`, no alembic.ini."""
