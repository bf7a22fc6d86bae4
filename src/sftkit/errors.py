"""The base of every error sftkit raises for input the user can fix.

`str(err)` is the message the CLI prints: it names the file, row or key, the value and what to do.
The library never exits the process; the CLI turns these into `error: ...` and exit code 2.

    SftkitError
      ConfigError (sftkit.config)   DataError (sftkit.data.formats; TemplateError)
      ModelError (sftkit.model.load)   ExportError (sftkit.export)
      TrainingError (sftkit.train.errors)   CheckpointError (sftkit.train.checkpoint)

`USER_ERRORS` in `sftkit.api` lists every class the CLI reports without a traceback.
"""

from __future__ import annotations


class SftkitError(Exception):
    """Input or state the user can fix; the message says what and how."""
