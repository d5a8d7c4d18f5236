"""Reports: HTML (jinja2 + plotly, offline), JSON summary and merged Perfetto trace.

Not built yet: see the reports issue. Installed as ``perfkit.reports``.
"""
