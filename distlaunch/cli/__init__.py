"""The ``distlaunch`` command line (click). The only place that talks to the terminal."""
