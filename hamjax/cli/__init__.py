"""The `hamjax` command line: train | eval."""
