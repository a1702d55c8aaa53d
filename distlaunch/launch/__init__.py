"""The launcher process: your terminal, batch script or Python session.

launcher (prepare and launch: the pipeline end to end), supervise (mpirun under watch:
signals, timeouts, leftovers), history (past runs: find, cancel, merge logs), api
(``Job(...).submit()`` → ``Run``), metrics (reading, TensorBoard, plots),
horovod_build (``distlaunch install-horovod``).
"""
