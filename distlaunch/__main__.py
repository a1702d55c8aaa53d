"""``python -m distlaunch``: the same as the ``distlaunch`` command."""
from .cli.main import main

if __name__ == "__main__":
    main()
