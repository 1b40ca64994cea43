"""The optional parts: each file here is a feature a default run does not need, listed with its config keys,
command and tests in utils/parts.py's table. Delete a part's files (the README's table names them) and the
rest trains as before."""
