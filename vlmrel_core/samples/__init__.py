"""The shipped sample data: its catalog (one place that knows the paths) and `vlmrel refresh-sample-data`."""
