"""Reports: what a person reads. The HTML report (``html``, jinja2 templates and plotly ``figures``,
offline), the comparison and sweep/optimize pages, the CLI's text (``text``), the merged Perfetto
trace (``perfetto``), and ``publish``, the analyze -> analysis.json -> report sequence. No metric is
computed here. Installed as ``perfkit.reports``.
"""
