"""What every stage shares at run time, below the model and file layers (imports only ``errors``).

- ``device``: which device a name means, and how much memory is left on it.
- ``seed``: the seeds torch takes, checked once for the recipe, generate and serve.
- ``finite``: the one check that weights are finite (at load, save and every training step).
- ``fsutil``: directories that are complete or absent; a full disk found behind whatever the writer raised.
- ``outdir``: output directories: never an input, the manifest ``--overwrite`` follows, the run lock.
"""
