"""Training and evaluation: ``run`` sets up a run and evaluates checkpoints (what ``train.py`` and ``test.py`` call),
``cli`` their command lines, ``build`` the name -> object tables, ``trainer`` the step loop and ``evaluate``,
``hooks`` the optional behaviour around the step."""
