"""Training with Lightning: the LightningModule, callbacks, checkpoint I/O and the run entry points.

``diffmic.training.run.fit`` / ``evaluate`` are what ``diffmic fit|validate|test`` call.
Importing this package does not import Lightning; import the submodules you need.
"""
