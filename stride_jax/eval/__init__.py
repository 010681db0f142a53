"""Evaluation: ground-truth retrains (``groundtruth``), LDS and its statistics (``metrics``), the
run report (``report``: table.md, lds.png)."""
