"""Alembic migrations of the run store (see bot/store/); run by `Store`, no alembic.ini."""
