"""Trimo's run pages: the runs list, a run's page with its live log, a pipeline's runs.

A Flask package of its own beside `webhooks/`: both depend on `bot/`, `bot/` on neither.
`init_app` adds the pages to the receiver's app (`trimo serve`); `create_app` makes a
standalone one (`trimo ui`).
"""
