"""A manager module that cannot even be imported (for start-up failure tests)."""
raise RuntimeError("broken_import: this module fails at import on purpose")
