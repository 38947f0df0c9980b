"""What a measurement returns and how it is kept: ``Result`` and its ``Settings``, the typed
``Provenance``, atomic validated files, resume progress, and layer matching for comparisons."""
