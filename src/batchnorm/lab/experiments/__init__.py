"""One module per lab experiment; see ``batchnorm.lab.registry`` for the contract."""
