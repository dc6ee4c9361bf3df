"""The paper's experiments as commands (``rag-replicate study=<name>``) and their tables and plots.

- :mod:`rag.replication.provenance`: the commit, command and hardware each result names;
- :mod:`rag.replication.training`: resumable rag-train runs in fixed folders (the reference model's stages,
  and the cells of the studies that train);
- :mod:`rag.replication.evaluate`: answering a split's questions, optionally from passages retrieved once;
- :mod:`rag.replication.studies`: Table 1, Table 6, Figure 3, the index hot-swap (section 4.5) and the
  decoding comparison, each writing ``result.json`` to its run folder;
- :mod:`rag.replication.aggregate`: run folders -> markdown and CSV tables laid out like the paper's, PNG plots,
  and the tables of ``RESULTS.md``;
- :mod:`rag.replication.paper`: the paper's own numbers for the same tables, with where they come from.
"""
