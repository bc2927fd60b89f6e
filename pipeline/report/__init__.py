"""The run report (report.html) and the terminal views `curate stats` / `curate inspect`."""
