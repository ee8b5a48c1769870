"""Fast implementations of the losses in :mod:`xent.losses`, chosen by :mod:`xent.kernels.dispatch`."""
