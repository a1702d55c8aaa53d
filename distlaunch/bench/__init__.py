"""What the ranks of ``distlaunch bench`` rows run that is not ``distlaunch.hvd``'s own
(importing this package chooses no Horovod runtime: rows such as torchrun + DDP and the
no-communication ceiling must not depend on that choice)."""
