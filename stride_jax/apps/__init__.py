"""Applications of attribution scores, each written once for any task and any method's score
matrix (queries x training examples): data selection (``selection``), contamination audit
(``contamination``), tail-patch (``tailpatch``), top-k removal (``removal``) and per-query
reports (``explain``). ``apps.run`` opens a run's workdir (base model and scores cached by the
LDS job are reused); ``apps.config`` holds the ``apps`` block of a run config.

Submodules load when imported (this package stays light: ``job.config`` imports its config).
"""
