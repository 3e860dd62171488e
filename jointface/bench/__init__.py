"""Benchmarks: the protocols of ``../shared/PROTOCOLS.md`` run against engines. Nothing in the core imports
this package.

* :mod:`.run` - run a protocol by name, write its JSON and Markdown; :mod:`.registry` - the protocols by name;
* the protocols: :mod:`.lfw` (P1-P3), :mod:`.speed` (P4), :mod:`.gallery_speed` (P5),
  :mod:`.backend_speed` (P5 across vector backends), :mod:`.p6` (P6), :mod:`.cluster` (clustering);
* shared: :mod:`.common` (run context, subset, reference boxes, results records), :mod:`.cache` (detection
  cache), :mod:`.metrics` (CMC, FPIR/TPIR, DET, verification accuracy, IoU; pure numpy), :mod:`.plots`
  (figures, Markdown tables), :mod:`.protocols` (the splits, from :mod:`jointface.datasets.protocols`);
* :mod:`.report` - the README's results section and the weights card from the JSON files.
"""
